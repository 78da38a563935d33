"""
gpt.py: a character-level GPT, pretrained on Tiny Shakespeare. Step 1 of minibard.

The model every later step imports: `GPT` (pre-norm blocks, rotary positions, a token mix, tied
embeddings) with `generate` (KV cache, per-token log-probs, an end-of-turn stop). Pretraining,
nanoGPT's train.py condensed, runs under `if __name__ == '__main__':` and writes out/gpt.pt (the
best-val checkpoint) and out/gpt.json (val_loss, train_loss, iters, seconds, tokens_per_sec, ...).

Run:  python gpt.py                  (a CUDA machine gets the GPU sizes; times and numbers: README)
      python gpt.py --max_iters=200  (any global below can be overridden; --help lists them)
      python gpt.py --init_from=resume --max_iters=8000  (continue: optimizer, iter, data order)
"""
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from plumbing import (ByDevice, configure, count, decode, die, encode, eta, get_batch, load_checkpoint,
                      load_model, load_splits, load_weights, lr_at, prepare_out_dir, save_checkpoint)

# ----------------------------------------------------------------------------------------
# hyperparameters (plain globals; `--key=value` overrides any of them, see configure())
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', 'cuda:1', ...; sizes follow it
out_dir = 'out'                 # where checkpoints and metrics go
data_path = 'input.txt'         # Tiny Shakespeare, 1,115,394 chars; first 90% train
init_from = 'scratch'           # in {'scratch', 'resume'}: resume continues from out_dir/gpt.pt
seed = 1337                     # in [0, inf): same seed + same settings = same losses on CPU
# model
n_layer = ByDevice(cpu=2, cuda=6)  # in [1, inf): depth; on 2 cores fewer layers, more steps win (docs/log.md)
n_head = ByDevice(cpu=4, cuda=6)  # in [1, inf): attention heads; n_embd must divide by it
n_embd = ByDevice(cpu=128, cuda=384)  # in [2, inf): width (head size n_embd / n_head even: rotary)
token_mix = 3                   # in [1, inf): input at t mixes the last this many chars (1 = off)
block_size = 256                # in [2, inf): context in characters (RLHF: prompt + a turn fit)
dropout = ByDevice(cpu=0.0, cuda=0.2)  # in [0, 1): the small CPU model underfits: dropout only costs it
# optimisation: AdamW, linear warmup, then decay to min_lr (cosine: nanoGPT's schedule)
batch_size = ByDevice(cpu=3, cuda=64)  # in [1, inf): sequences per micro-batch: on 2 cores, steps count
gradient_accumulation_steps = None  # int in [1, inf) or None: micro-batches a step, all ranks (None: 1 each)
max_iters = ByDevice(cpu=6000, cuda=5000)  # in [0, inf): optimizer steps (times: README)
learning_rate = ByDevice(cpu=3e-3, cuda=1e-3)  # in (0, inf): a tiny model takes a high lr
min_lr_ratio = ByDevice(cpu=0.0, cuda=0.1)  # in [0, 1]: decay ends at lr * this (CPU: 0 wins, docs/log.md)
lr_decay = ByDevice(cpu='linear', cuda='cosine')  # in {'cosine', 'linear'}: linear: Bergsma et al. 2025
warmup_iters = 100              # in [0, inf): short warmup: tiny models tolerate a high lr early
weight_decay = 0.1              # in [0, inf): on matrices only (not norms, not biases)
beta1, beta2 = 0.9, 0.99        # in [0, 1): beta2 0.99 as nanoGPT's shakespeare_char: few tokens/step
grad_clip = 1.0                 # in [0, inf): clip the global grad norm (0 = off)
# evaluation and logging
eval_interval = ByDevice(cpu=1000, cuda=250)  # in [1, inf): estimate train/val loss every this many iters
eval_iters = ByDevice(cpu=20, cuda=200)  # in [1, inf): batches per estimate (final: the whole val split)
log_interval = 100              # in [1, inf): print an iter line every this many iters
sample_chars = 500              # in [0, inf): length of the sample printed at the end
compile = False                 # torch.compile (worth it on GPU; CPU compile costs more)
# ----------------------------------------------------------------------------------------

# ------------------------------------------------------------------ the model
@dataclass
class GPTConfig:
    block_size: int = 128
    vocab_size: int = 65
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    token_mix: int = 3
    dropout: float = 0.0


def rotary(x, cos, sin):
    """Rotary position embedding (Su et al. 2021, RoFormer): rotate pairs (x1_i, x2_i) of each
    head by angle pos * theta_i, so q . k depends only on the distance. x (B, nh, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hd/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.layer, self.dropout = config.n_head, layer, config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache=None):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # 3 x (B, nh, T, hd)
                   for t in self.qkv(x).split(C, dim=2))
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)  # positions enter here, relative
        if cache is not None:  # keep this step's k, v; attend over everything cached
            p = cache.pos
            assert p == 0 or T == 1, 'prefill from an empty cache, then one token at a time'
            cache.k[self.layer, :, :, p:p + T] = k
            cache.v[self.layer, :, :, p:p + T] = v
            k, v = cache.k[self.layer, :, :, :p + T], cache.v[self.layer, :, :, :p + T]  # (B,nh,p+T,hd)
        # softmax(q k^T / sqrt(hd)) v, causal: a single new token may see everything cached
        if T == 1 and cache is not None:  # one query: two small matmuls beat the CPU flash kernel
            y = torch.softmax((q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5, -1) @ v  # (B, nh, 1, hd)
        else:  # causal; fp32 even under CPU bf16 autocast (reward.py's), where bf16 is slower (docs/log.md)
            with torch.autocast('cpu', enabled=False):
                drop = self.dropout if self.training else 0.0
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=T > 1,
                                                   dropout_p=drop)  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x)) (GPT-2)."""
    def __init__(self, config, layer):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd, bias=False)
        self.ln2 = nn.LayerNorm(config.n_embd, bias=False)
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.ln1(x), cos, sin, cache)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.tok_mix = nn.Parameter(torch.zeros(config.token_mix, config.n_embd))  # (m, C): see hidden()
        self.tok_mix.data[-1] = 1.0  # starts as the plain embedding
        hd = config.n_embd // config.n_head  # rotary angles pos * 10000^(-2i/hd)
        theta = 10000 ** (-torch.arange(0, hd, 2).float() / hd)  # (hd/2,)
        angles = torch.outer(torch.arange(config.block_size).float(), theta)
        self.register_buffer('cos', angles.cos(), persistent=False)  # (block_size, hd/2)
        self.register_buffer('sin', angles.sin(), persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied input/output embedding (Press & Wolf 2017)
        for module in self.modules():  # GPT-2's init: N(0, 0.02), residual projections / sqrt(2 L)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith('proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def hidden(self, idx, cache=None):
        """Final-norm hidden states (B, T, C): the trunk the reward model and critic reuse."""
        B, T = idx.shape
        p = cache.pos if cache is not None else 0
        assert p + T <= self.config.block_size, f'{p + T} tokens exceed block_size {self.config.block_size}'
        cos, sin = self.cos[p:p + T], self.sin[p:p + T]  # (T, hd/2): positions p .. p + T - 1
        e = self.tok_emb(idx)  # (B, T, C)
        # Token mix (Primer's depthwise convolution, So et al. 2021; RWKV's token shift): x_t =
        # sum_j w_j e_{t-m+1+j}, a learned per-channel mix of the last m embeddings (e = 0 before
        # the context), so the first layer's attention need not spend itself on gathering n-grams.
        m = self.tok_mix.size(0)  # token_mix
        prev = cache.emb_tail if cache is not None and p > 0 else e.new_zeros(B, m - 1, e.size(2))
        ep = torch.cat([prev, e], dim=1)  # (B, m - 1 + T, C)
        if cache is not None:
            cache.emb_tail = ep[:, T:]  # (B, m - 1, C), for the next token
        x = self.drop(sum(self.tok_mix[j] * ep[:, j:j + T] for j in range(m)))  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.pos += T
        return self.ln_f(x)  # (B, T, C)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) -> logits (B, T, vocab), and the mean cross-entropy if targets (B, T) given."""
        logits = self.lm_head(self.hidden(idx, cache))  # (B, T, V)
        loss = None
        if targets is not None:  # L = -1/(B T) sum_{b,t} log softmax(logits)[b, t, targets[b, t]]
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def configure_optimizers(self, weight_decay, **adamw):
        """AdamW with weight decay on the matrices only, as nanoGPT and GPT-2: not on norms, and
        not on the token mix, which decay would pull towards 'see no character' instead of the
        identity it starts as."""
        decay = {n: p.dim() >= 2 and n != 'tok_mix' for n, p in self.named_parameters()}
        params = lambda d: [p for n, p in self.named_parameters() if decay[n] == d]
        groups = [{'params': params(True), 'weight_decay': weight_decay},
                  {'params': params(False), 'weight_decay': 0.0}]
        return torch.optim.AdamW(groups, **adamw)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, stop=None):
        """Sample up to max_new_tokens after idx (B, T) -> out (B, T + n), logprobs (B, n), lengths (B,).

        stop: token ids that end a row (END_OF_TURN encoded), part of its answer; after them the
        row is padded with stop[-1] and log-probability 0; n is the longest row. temperature 0 is
        argmax; logprobs are log pi(y_t) at the temperature (and top_k) y_t was drawn with. With
        the KV cache a new token costs one position, not T; finished rows leave the batch once they
        are a quarter of it. Past block_size the full cache restarts from the last block_size // 2
        tokens, so every logit is a plain forward over the last block_size / 2 to block_size tokens."""
        window, B, T = self.config.block_size, idx.size(0), idx.size(1)
        stop_ids = torch.tensor(stop or [], dtype=idx.dtype, device=idx.device)
        out = idx.new_full((B, T + max_new_tokens), stop[-1] if stop else 0)
        out[:, :T] = idx
        logps = torch.zeros(B, max_new_tokens, device=idx.device)
        lengths = torch.full((B,), max_new_tokens, device=idx.device)
        rows = torch.arange(B, device=idx.device)  # batch row -> row of out
        live = torch.ones(B, dtype=torch.bool, device=idx.device)  # rows still writing
        cache = KVCache(self.config, B, idx.device, self.tok_emb.weight.dtype,
                        length=min(window, T + max_new_tokens))
        logits = self(idx[:, -window:], cache=cache)[0][:, -1]  # prefill the (cropped) prompt
        for i in range(max_new_tokens):
            last = logits.float()  # (R, V)
            if top_k is not None:  # keep the k largest, -inf elsewhere
                kth = torch.topk(last, min(top_k, last.size(-1))).values[:, [-1]]
                last = last.masked_fill(last < kth, float('-inf'))
            if temperature == 0:
                nxt = last.argmax(-1)  # (R,)
            else:
                nxt = torch.multinomial(F.softmax(last / temperature, dim=-1), 1, generator=generator)[:, 0]
            out[rows[live], T + i] = nxt[live]
            logps[rows[live], i] = token_logprobs(last[live], nxt[live], temperature or 1.0)
            if len(stop_ids) and i + 1 >= len(stop_ids):  # rows whose answer now ends in stop
                ended = live & (out[rows, T + i + 1 - len(stop_ids):T + i + 1] == stop_ids).all(1)
                lengths[rows[ended]] = i + 1
                live &= ~ended
            if i == max_new_tokens - 1 or not live.any():
                break
            if (~live).sum() * 4 >= len(live):  # drop finished rows from the batch
                rows, nxt, cache = rows[live], nxt[live], cache.select(live)
                live = live[live]
            if cache.pos == window:  # full: re-prefill the last half
                cache.pos = 0
                logits = self(out[rows, T + i + 1 - window // 2:T + i + 1], cache=cache)[0][:, -1]
            else:
                logits = self(nxt[:, None], cache=cache)[0][:, -1]  # one position, O(cache) attention
        n = int(lengths.max()) if B else 0
        return out[:, :T + n], logps[:, :n], lengths


# ------------------------------------------------------------------ generate()'s cache; log-probs PPO shares
class KVCache:
    """Keys and values of every layer for the `pos` tokens seen so far: k, v (n_layer, B, n_head,
    length <= block_size, head_dim); a forward writes its keys at pos.. and attends over the first
    pos + T. emb_tail (B, token_mix - 1, C): the last embeddings, for the next token's mix."""
    def __init__(self, config, B, device, dtype, length=None):
        hd = config.n_embd // config.n_head
        shape = (config.n_layer, B, config.n_head, length or config.block_size, hd)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.emb_tail, self.pos = None, 0

    def select(self, keep):
        """Keep only the batch rows where keep (B,) is True (finished answers leave the batch)."""
        shape = self.k.shape[:1] + (int(keep.sum()),) + self.k.shape[2:]
        k, v = self.k.new_empty(shape), self.v.new_empty(shape)
        k[..., :self.pos, :] = self.k[:, keep, :, :self.pos]
        v[..., :self.pos, :] = self.v[:, keep, :, :self.pos]
        self.k, self.v = k, v
        self.emb_tail = self.emb_tail[keep] if self.emb_tail is not None else None
        return self


def log_probs(logits, temperature=1.0):
    """log softmax(logits / temperature) over the characters, in fp32: (..., V) -> (..., V). The
    one place it is computed: sampling, PPO, the entropy and the exact KL share the math and the
    temperature (Huang et al., "The N implementation details of RLHF", detail 2)."""
    return F.log_softmax(logits.float() / max(temperature, 1e-8), dim=-1)


def token_logprobs(logits, tokens, temperature=1.0):
    """log pi(token | context) under softmax(logits / temperature): (B, T, V), (B, T) -> (B, T)."""
    return log_probs(logits, temperature).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# ------------------------------------------------------------------ evaluation and loading
@torch.no_grad()
def estimate_loss(model, splits, block_size, batch_size, n_batches, seed, device):
    """Mean loss over the same n_batches random batches of each split at every call: {split: loss}."""
    model.eval()
    out = {}
    for name, data in splits.items():
        gen = torch.Generator().manual_seed(seed + 1)
        losses = [model(*get_batch(data, block_size, batch_size, gen, device))[1].item()
                  for _ in range(n_batches)]
        out[name] = sum(losses) / len(losses)
    model.train()
    return out


@torch.no_grad()
def split_loss(model, data, batch=64):
    """Mean cross-entropy over a whole split (1-D tokens), in non-overlapping block_size windows."""
    T, dev = model.config.block_size, next(model.parameters()).device
    n = (len(data) - 1) // T
    x, y = data[:n * T].view(n, T).to(dev), data[1:n * T + 1].view(n, T).to(dev)  # (n, T) each
    total = sum(model(xb, yb)[1].item() * len(xb) for xb, yb in zip(x.split(batch), y.split(batch)))
    return total / n


def load_gpt(path, run_first='python gpt.py', device='cpu'):
    """(GPT in eval mode, vocab, checkpoint dict) from a checkpoint of gpt.py or ppo.py."""
    return load_model(path, lambda checkpoint: GPT(GPTConfig(**checkpoint['model_args'])), run_first, device)


# ------------------------------------------------------------------ pretraining
if __name__ == '__main__':
    # One process, or N under torchrun (it sets RANK and WORLD_SIZE): DistributedDataParallel, as
    # nanoGPT's train.py. Each rank trains on its own micro-batches, the gradients are averaged over
    # the ranks after the last one; every rank evaluates (the same numbers), rank 0 writes and logs.
    ddp = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
    master = rank == 0
    if not master:
        sys.stdout = open(os.devnull, 'w')  # one log, rank 0's
    config = configure(globals(), sys.argv[1:])  # each option against its rule, then:
    if max_iters == 0 and init_from == 'scratch':
        die('--max_iters=0 from scratch trains nothing: give it some iterations, or add '
            '--init_from=resume to re-measure out_dir/gpt.pt')
    if n_embd % n_head or (n_embd // n_head) % 2:
        die(f'--n_embd={n_embd} must split into --n_head={n_head} heads of an even size (rotary pairs)')
    accum = gradient_accumulation_steps or world  # micro-batches a step, all ranks
    if accum % world:
        die(f'--gradient_accumulation_steps={accum} must be a multiple of the {world} processes (each takes '
            'an equal share of every step)')
    cuda = torch.device(device).type == 'cuda'  # also 'cuda:1'; CPU: fp32
    if ddp:
        if cuda:  # one GPU a process
            device = config['device'] = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if cuda else 'gloo')
    t_start = time.time()
    prepare_out_dir(out_dir)
    torch.manual_seed(seed)
    train_data, val_data, vocab = load_splits(data_path)
    splits = {'train': train_data, 'val': val_data}
    if block_size >= len(val_data):
        die(f'--block_size={block_size} is not shorter than the validation text ({len(val_data):,} chars)')
    ckpt_path = os.path.join(out_dir, 'gpt.pt')
    # micro-batch j of every step comes from data stream j (seed + j): the same windows whether one
    # process takes them all or N ranks take accum / N each; this rank's streams are `mine`
    mine = range(rank * accum // world, (rank + 1) * accum // world)
    gens = [torch.Generator().manual_seed(seed + j) for j in mine]
    model_args = dict(block_size=block_size, vocab_size=len(vocab), n_layer=n_layer, n_head=n_head,
                      n_embd=n_embd, token_mix=token_mix, dropout=dropout)
    iter_num, best_val, checkpoint = 0, float('inf'), None
    if init_from == 'resume':
        checkpoint = load_checkpoint(ckpt_path)
        if checkpoint['vocab'] != vocab:
            die(f'{ckpt_path} was trained on another vocabulary than {data_path}')
        model_args = checkpoint['model_args']  # the shape comes from the checkpoint, not the flags
        iter_num, best_val = checkpoint['iter_num'], checkpoint['best_val_loss']
        states = checkpoint.get('rng_states') or [checkpoint['rng_state']]  # one per data stream
        if len(states) != accum:
            die(f'{ckpt_path} was trained with {len(states)} micro-batches a step: resume with '
                f'--gradient_accumulation_steps={len(states)}')
        for g, j in zip(gens, mine):
            g.set_state(states[j])
    model = GPT(GPTConfig(**model_args)).to(device)
    optimizer = model.configure_optimizers(weight_decay, lr=learning_rate, betas=(beta1, beta2), fused=True)
    if checkpoint is not None:
        load_weights(model, checkpoint['model'], ckpt_path, 'python gpt.py')
        load_weights(optimizer, checkpoint['optimizer'], ckpt_path, 'python gpt.py')
        print(f'resuming from {ckpt_path} at iter {iter_num} (best val loss {best_val:.4f})')
    fwd = torch.compile(model) if compile else model  # evaluation: this rank alone
    step_fwd = DDP(fwd) if ddp else fwd  # training: gradients averaged
    ctx = torch.autocast('cuda' if cuda else 'cpu', dtype=torch.bfloat16, enabled=cuda)
    print(f'{model.num_params() / 1e6:.2f}M parameters, {len(train_data):,} train / '
          f'{len(val_data):,} val chars, device {device}'
          + (f', {world} processes x {accum // world} micro-batch(es) of {batch_size}' if ddp else '')
          + (f', {accum} micro-batches of {batch_size} a step' if accum > 1 and not ddp else ''))

    train_time, last_train = 0.0, float('nan')
    diverged = f'try a lower --learning_rate; {ckpt_path} keeps the last good model'
    t_loop, start_iter = time.time(), iter_num  # the pace for the eta
    while True:
        if iter_num % eval_interval == 0 or iter_num == max_iters:
            losses = estimate_loss(fwd, splits, block_size, batch_size, eval_iters, seed, device)
            last_train = losses['train']
            print(f'step {iter_num}: train loss {losses["train"]:.4f}, val loss {losses["val"]:.4f}'
                  + (f', {eta(iter_num, max_iters, t_loop, start_iter)}' if iter_num > start_iter else ''))
            if not math.isfinite(losses['val']):
                die(f'val loss is {losses["val"]} at iter {iter_num}: {diverged}')
            if losses['val'] < best_val:
                best_val = losses['val']
                states = [g.get_state() for g in gens]  # every stream, for a resume
                if ddp:
                    everyone = [None] * world
                    dist.all_gather_object(everyone, states)
                    states = [s for rank_states in everyone for s in rank_states]
                if iter_num > 0 and master:
                    save_checkpoint({'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                                     'model_args': model_args, 'config': config, 'vocab': vocab,
                                     'iter_num': iter_num, 'best_val_loss': best_val,
                                     'train_loss': last_train, 'rng_states': states}, ckpt_path)
        if iter_num >= max_iters:
            break
        t0 = time.time()
        for group in optimizer.param_groups:
            group['lr'] = lr_at(iter_num, learning_rate, warmup_iters, max_iters, min_lr_ratio, lr_decay)
        step_loss = 0.0
        for i, g in enumerate(gens):  # L = 1/accum sum_j L_j over all ranks
            x, y = get_batch(train_data, block_size, batch_size, g, device)  # (B, T) each
            if ddp:  # average over ranks at the last only
                step_fwd.require_backward_grad_sync = i == len(gens) - 1
            with ctx:
                _, loss = step_fwd(x, y)
            (loss * world / accum).backward()  # DDP's average over ranks: / world
            step_loss += loss.detach() / len(gens)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.time() - t0
        train_time += dt
        iter_num += 1
        if iter_num % log_interval == 0:
            if ddp:
                dist.all_reduce(step_loss)  # the mean over all ranks' micro-batches
                step_loss /= world
            lossf = float(step_loss)
            if not math.isfinite(lossf):
                die(f'loss is {lossf} at iter {iter_num}: {diverged}')
            print(f'iter {count(iter_num, max_iters)}: loss {lossf:.4f}, time {dt * 1000:.1f} ms, '
                  f'{batch_size * accum * block_size / dt:,.0f} tok/s, '
                  f'{eta(iter_num, max_iters, t_loop, start_iter)}')
    if ddp:
        dist.destroy_process_group()
    if not master:
        sys.exit(0)

    seconds = time.time() - t_start
    model, _, best = load_gpt(ckpt_path, device=device)  # the best checkpoint:
    val_loss = split_loss(model, val_data)  # its loss on the whole val split
    print(f'best checkpoint (iter {best["iter_num"]}): val loss {val_loss:.4f} on all {len(val_data):,} '
          'val chars')
    start_ids = torch.tensor([encode('\n', vocab)], device=device)
    sample = model.generate(start_ids, sample_chars, generator=torch.Generator(device).manual_seed(seed))[0]
    print('-' * 80 + '\n' + decode(sample[0, 1:], vocab) + '\n' + '-' * 80)
    tokens = (iter_num - start_iter) * batch_size * accum * block_size
    metrics = {'val_loss': round(val_loss, 4), 'train_loss': round(best['train_loss'], 4), 'iters': iter_num,
               'seconds': round(seconds, 1), 'params': model.num_params(),
               'tokens_per_sec': round(tokens / max(train_time, 1e-9)), 'device': device, 'processes': world}
    with open(os.path.join(out_dir, 'gpt.json'), 'w') as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps(metrics))
