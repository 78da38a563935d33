"""
gpt.py: a character-level GPT, pretrained on Tiny Shakespeare. Step 1 of minibard.

This file is also the library every later step imports: the model (`GPTConfig`, `GPT`,
`generate` with a KV cache and per-token log-probabilities), the char codec, the
`--key=value` override parser and the checkpoint helpers. Importing it only defines things;
training happens under `if __name__ == '__main__':`.

Run:
    python gpt.py                        # CPU: ~3.5 min on 2 cores, val loss ~1.55
    python gpt.py --max_iters=200        # any global below can be overridden
    python gpt.py --init_from=resume --max_iters=5000  # continue from out/gpt.pt (optimizer, iter, data order)
On a CUDA machine the same command picks the bigger GPU defaults (nanoGPT's baby GPT shape).

Writes out/gpt.pt (the best-val checkpoint) and out/gpt.json (val_loss, train_loss, iters,
seconds, params, tokens_per_sec, device). Expected numbers are in README.md.
"""
import ast
import difflib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------
# hyperparameters (plain globals; `--key=value` overrides any of them, see configure())
_gpu = torch.cuda.is_available()  # CPU and GPU get different default sizes (underscore: not a flag)
device = 'cuda' if _gpu else 'cpu'
out_dir = 'out'                 # where checkpoints and metrics go
data_path = 'input.txt'         # Tiny Shakespeare, 1,115,394 chars; first 90% train
init_from = 'scratch'           # 'scratch' or 'resume' (continue from out_dir/gpt.pt)
seed = 1337                     # same seed + same settings = same losses on CPU
# model
n_layer = 6 if _gpu else 2      # depth; on 2 CPU cores fewer layers and more steps win (see README)
n_head = 6 if _gpu else 4       # attention heads; n_embd must divide by it
n_embd = 384 if _gpu else 128   # width
token_mix = 3                   # the input at t mixes the embeddings of the last this many chars (1 = off)
block_size = 256 if _gpu else 128  # context length in characters (RLHF needs prompt + answer <= it)
dropout = 0.2 if _gpu else 0.0  # the small CPU model underfits: dropout only costs it
# optimisation: AdamW, linear warmup, then decay to min_lr (cosine: nanoGPT's schedule)
batch_size = 64 if _gpu else 6  # sequences per step: on 2 cores the number of steps is what counts
max_iters = 5000 if _gpu else 6000  # CPU: ~185 s of steps on 2 cores
learning_rate = 1e-3 if _gpu else 3e-3  # a tiny model takes a high lr
min_lr_ratio = 0.1 if _gpu else 0.0  # decay ends at lr * this; to 0 won 0.015 on CPU (Bergsma et al. 2025)
lr_decay = 'cosine' if _gpu else 'linear'  # 'cosine' or 'linear'; linear to 0 won 0.008 on CPU (same paper)
warmup_iters = 100              # short warmup: tiny models tolerate a high lr early
weight_decay = 0.1              # on matrices only (not norms, not biases)
beta1, beta2 = 0.9, 0.99        # beta2 0.99 as nanoGPT's shakespeare_char: few tokens/step
grad_clip = 1.0                 # clip the global grad norm (0 = off)
# evaluation and logging
eval_interval = 250 if _gpu else 1000  # estimate train/val loss every this many iters
eval_iters = 200 if _gpu else 20      # batches per estimate (the final val loss uses the whole split)
log_interval = 100                 # print an iter line every this many iters
sample_chars = 500              # length of the sample printed at the end
compile = False                 # torch.compile (worth it on GPU; CPU compile costs more)
# ----------------------------------------------------------------------------------------


def die(msg):
    """A user mistake: one line saying what to do, non-zero exit, no traceback."""
    print(f'error: {msg}', file=sys.stderr)
    sys.exit(1)


def _interrupted(kind, value, tb, default=sys.excepthook):
    """Ctrl-C anywhere: one line, no traceback. Checkpoints are only ever replaced whole (see
    save_checkpoint), so whatever was saved before the interrupt is intact."""
    if issubclass(kind, KeyboardInterrupt):
        print('interrupted: stopped; checkpoints saved before now are intact', file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)
    default(kind, value, tb)


def configure(g, argv):
    """Apply `--key=value` overrides to the plain globals `g` of a script; return them as a dict.

    The value is read as a Python literal (`--lr=3e-4`, `--top_k=None`, `--start='ROMEO:'`),
    falling back to the raw string. Its type must match the default's (an int is accepted
    for a float); a default of None accepts anything. Unknown keys name the closest one.
    """
    sys.excepthook = _interrupted
    keys = [k for k, v in g.items() if not k.startswith('_') and isinstance(v, (bool, int, float, str, type(None)))]
    for arg in argv:
        if not arg.startswith('--') or '=' not in arg:
            die(f'cannot read argument {arg!r}: overrides look like --key=value')
        key, text = arg[2:].split('=', 1)
        if key not in keys:
            near = difflib.get_close_matches(key, keys, n=1, cutoff=0.0)  # always name the closest
            die(f'unknown option --{key}; did you mean --{near[0]}? (the options are the globals '
                f'at the top of {os.path.basename(g.get("__file__", "the script"))})')
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        old = g[key]
        if isinstance(old, float) and type(value) is int:
            value = float(value)
        if old is not None and value is not None and type(value) is not type(old):
            die(f'--{key} expects {type(old).__name__} (default {old!r}), got {text!r}')
        g[key] = value
    return {k: g[k] for k in keys}


# ------------------------------------------------------------------ the char codec
def build_vocab(text):
    """The sorted set of characters of the corpus (65 for Tiny Shakespeare)."""
    return ''.join(sorted(set(text)))


def encode(s, vocab):
    """str -> list of ints. A character outside the vocabulary is a user error, named."""
    stoi = {ch: i for i, ch in enumerate(vocab)}
    bad = sorted(set(ch for ch in s if ch not in stoi))
    if bad:
        die(f'characters not in the vocabulary: {"".join(bad)!r}; use only {vocab!r}')
    return [stoi[ch] for ch in s]


def decode(ids, vocab):
    """list (or 1-D tensor) of ints -> str."""
    return ''.join(vocab[i] for i in (ids.tolist() if torch.is_tensor(ids) else ids))


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


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to block_size.

    k, v: (n_layer, B, n_head, block_size, head_dim); `pos` tokens are filled. A forward
    with a cache writes the new keys at pos.. and attends over the first pos + T of them.
    emb_tail: (B, token_mix - 1, C), the last embeddings, for the token mix of the next input.
    """
    def __init__(self, config, B, device, dtype):
        shape = (config.n_layer, B, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.emb_tail = None
        self.pos = 0


def rotary(x, cos, sin):
    """Rotary position embedding (Su et al. 2021, RoFormer): rotate pairs (x1_i, x2_i) of each head by
    angle pos * theta_i, so q . k depends only on the distance between positions. x (B, nh, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)                                      # (B, nh, T, hd/2) each
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
        q, k, v = self.qkv(x).split(C, dim=2)                         # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)               # positions enter here, relative
        if cache is not None:                                         # keep this step's k, v
            p = cache.pos
            assert p == 0 or T == 1, 'prefill from an empty cache, then one token at a time'
            cache.k[self.layer, :, :, p:p + T] = k
            cache.v[self.layer, :, :, p:p + T] = v
            k, v = cache.k[self.layer, :, :, :p + T], cache.v[self.layer, :, :, :p + T]  # (B, nh, p+T, hd)
        # softmax(q k^T / sqrt(hd)) v, causal: a single new token may see everything cached
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)              # (B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))              # (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x)) (GPT-2)."""
    def __init__(self, config, layer):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(config.n_embd, bias=False), nn.LayerNorm(config.n_embd, bias=False)
        self.attn, self.mlp = CausalSelfAttention(config, layer), MLP(config)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.ln1(x), cos, sin, cache)
        return x + self.mlp(self.ln2(x))


def token_logprobs(logits, tokens, temperature=1.0):
    """log pi(token | context) under softmax(logits / temperature): (B, T, V), (B, T) -> (B, T).

    The one place a log-probability of chosen tokens is computed: sampling in generate() and
    the PPO forward passes both call it, so rollout and training log-probs use the same math
    and the same temperature (Huang et al., "N implementation details of RLHF", detail 2).
    """
    logp = F.log_softmax(logits.float() / max(temperature, 1e-8), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.tok_mix = nn.Parameter(torch.zeros(config.token_mix, config.n_embd))  # (K, C), see hidden()
        self.tok_mix.data[-1] = 1.0                                   # starts as the plain embedding
        hd = config.n_embd // config.n_head                           # rotary angles pos * 10000^(-2i/hd)
        angles = torch.outer(torch.arange(config.block_size).float(), 10000 ** (-torch.arange(0, hd, 2).float() / hd))
        self.register_buffer('cos', angles.cos(), persistent=False)   # (block_size, hd/2)
        self.register_buffer('sin', angles.sin(), persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=False)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied input/output embedding (Press & Wolf 2017)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 L)
            if name.endswith('proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def hidden(self, idx, cache=None):
        """Final-norm hidden states (B, T, C): the trunk the reward model and critic reuse."""
        B, T = idx.shape
        p = cache.pos if cache is not None else 0
        assert p + T <= self.config.block_size, f'{p + T} tokens exceed block_size {self.config.block_size}'
        cos, sin = self.cos[p:p + T], self.sin[p:p + T]               # (T, hd/2) for positions p..p+T-1
        e = self.tok_emb(idx)                                         # (B, T, C)
        # Token mix, after the depthwise convolutions of Primer (So et al. 2021) and RWKV's token
        # shift (Peng et al. 2023): x_t = sum_j w_j * e_{t-K+1+j}, a learned per-channel mix of the
        # last K embeddings (before the context starts, e = 0). A char-level model otherwise
        # spends attention in its first layer on gathering n-grams. It costs one (B, T, C) sum a
        # forward; it took val loss from 1.6156 to 1.5857 (4 layers x 128, 3800 iters, 2 CPU cores).
        K = self.tok_mix.size(0)
        prev = cache.emb_tail if cache is not None and p > 0 else e.new_zeros(B, K - 1, e.size(2))
        ep = torch.cat([prev, e], dim=1)                              # (B, K - 1 + T, C)
        if cache is not None:
            cache.emb_tail = ep[:, T:]                                # (B, K - 1, C), for the next token
        x = self.drop(sum(self.tok_mix[j] * ep[:, j:j + T] for j in range(K)))  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.pos += T
        return self.ln_f(x)                                           # (B, T, C)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) -> logits (B, T, vocab), and the mean cross-entropy if targets (B, T) given."""
        logits = self.head(self.hidden(idx, cache))                   # (B, T, V)
        loss = None
        if targets is not None:  # L = -1/(B T) sum_{b,t} log softmax(logits)[b, t, targets[b, t]]
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, return_logprobs=False):
        """Sample max_new_tokens after idx (B, T); returns (B, T + max_new_tokens) [, logprobs (B, max_new)].

        temperature 0 is argmax. logprobs are log pi(y_t) under the same temperature (and top_k)
        the token was drawn with. A KV cache makes each new token cost one position, not T.
        Past block_size: the cache is full, so we restart it from the last block_size // 2
        tokens (one batched prefill) and go on. The context therefore always holds between
        block_size / 2 and block_size tokens, and every logit equals a plain forward over
        exactly that window (test_all.py checks it); the prefill is paid once per
        block_size / 2 new tokens instead of a full window recompute at every step.
        """
        bs = self.config.block_size
        cache = KVCache(self.config, idx.size(0), idx.device, self.tok_emb.weight.dtype)
        logits, _ = self(idx[:, -bs:], cache=cache)                   # prefill the (cropped) prompt
        start = max(0, idx.size(1) - bs)                              # first token of the context window
        out, logps = idx, []
        for i in range(max_new_tokens):
            last = logits[:, -1, :].float()                           # (B, V)
            if top_k is not None:                                     # keep the k largest, -inf elsewhere
                kth = torch.topk(last, min(top_k, last.size(-1))).values[:, [-1]]
                last = last.masked_fill(last < kth, float('-inf'))
            if temperature == 0:
                nxt = last.argmax(-1, keepdim=True)                   # (B, 1)
            else:
                probs = F.softmax(last / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            logps.append(token_logprobs(last, nxt.squeeze(1), temperature or 1.0))
            out = torch.cat([out, nxt], dim=1)
            if i == max_new_tokens - 1:
                break
            if cache.pos == bs:                                       # full: re-prefill the last bs//2
                start = out.size(1) - bs // 2
                cache.pos = 0
                logits, _ = self(out[:, start:], cache=cache)
            else:
                logits, _ = self(nxt, cache=cache)                    # one position, O(cache) attention
        if return_logprobs:
            return out, torch.stack(logps, dim=1) if logps else out.new_zeros(out.size(0), 0, dtype=torch.float)
        return out


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(obj, path):
    """Atomic save: write a temp file beside `path`, then os.replace, so a crash or Ctrl-C
    mid-write leaves the previous good checkpoint untouched."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, run_first='python gpt.py'):
    """Load a checkpoint dict with weights_only=True (a pickle could run code; ours never needs to)."""
    if not os.path.exists(path):
        die(f'no {path}: run {run_first} first')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated, corrupt, or a pickle that wants to run code
        die(f'cannot load {path} ({type(e).__name__}): delete it and run {run_first} again')


def load_model(path, run_first='python gpt.py', device='cpu'):
    """(GPT in eval mode, vocab, checkpoint dict) from a checkpoint written by any stage."""
    ckpt = load_checkpoint(path, run_first)
    model = GPT(GPTConfig(**ckpt['model_args']))
    load_weights(model, ckpt['model'], path, run_first)
    return model.to(device).eval(), ckpt['vocab'], ckpt


def load_weights(module, state, path, run_first):
    """load_state_dict, with a mismatch (a checkpoint edited or from another shape) as one clear line."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        die(f'{path} does not fit its own model shape ({str(e).splitlines()[0][:120]}): '
            f'delete it and run {run_first} again')


def prepare_out_dir(out_dir):
    """Make sure out_dir exists and is writable before any work is done."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f'.write_test{os.getpid()}'), 'w'):
            pass
        os.remove(os.path.join(out_dir, f'.write_test{os.getpid()}'))
    except OSError as e:
        die(f'cannot write to out_dir {out_dir!r} ({e.strerror}): choose another with --out_dir=...')


@torch.no_grad()
def split_loss(model, data, batch=64):
    """Mean cross-entropy over a whole split (1-D tokens), in non-overlapping block_size windows."""
    T = model.config.block_size
    n = (len(data) - 1) // T
    x, y = data[:n * T].view(n, T), data[1:n * T + 1].view(n, T)     # (n, T) each
    dev = next(model.parameters()).device
    total = sum(model(x[i:i + batch].to(dev), y[i:i + batch].to(dev))[1].item() * len(x[i:i + batch])
                for i in range(0, n, batch))
    return total / n


def load_text(path):
    """The corpus as a string; a missing or empty file is a user error."""
    if not os.path.exists(path):
        die(f'no {path}: copy Tiny Shakespeare there (see README.md)')
    with open(path, encoding='utf-8') as f:
        text = f.read()
    if len(text) < 1000:
        die(f'{path} has only {len(text)} characters: it should be Tiny Shakespeare (1,115,394)')
    return text


def load_splits(path, vocab=None):
    """(train, val, vocab): the corpus as token tensors, split by position (first 90% train).
    With a checkpoint's vocab, the corpus must use only its characters."""
    text = load_text(path)
    vocab = vocab or build_vocab(text)
    extra = set(text) - set(vocab)
    if extra:
        die(f'{path} has characters the checkpoint never saw ({"".join(sorted(extra))!r}): '
            f'train on this corpus from scratch with python gpt.py')
    data = torch.tensor(encode(text, vocab), dtype=torch.long)
    n = int(0.9 * len(data))
    return data[:n], data[n:], vocab


# ------------------------------------------------------------------ pretraining
if __name__ == '__main__':
    config = configure(globals(), sys.argv[1:])
    if lr_decay not in ('cosine', 'linear'):
        die(f"--lr_decay must be 'cosine' or 'linear', got {lr_decay!r}")
    if token_mix < 1:
        die(f'--token_mix must be at least 1 (1 = off), got {token_mix}')
    t_start = time.time()
    cuda = device == 'cuda'
    prepare_out_dir(out_dir)
    torch.manual_seed(seed)
    train_data, val_data, vocab = load_splits(data_path)
    splits = {'train': train_data, 'val': val_data}
    ckpt_path = os.path.join(out_dir, 'gpt.pt')
    gen = torch.Generator().manual_seed(seed)                         # batches: own stream, reproducible

    def get_batch(split, g=gen):
        d = splits[split]
        ix = torch.randint(len(d) - block_size - 1, (batch_size,), generator=g)
        x = torch.stack([d[i:i + block_size] for i in ix])           # (B, T)
        y = torch.stack([d[i + 1:i + 1 + block_size] for i in ix])   # (B, T), shifted by one
        return x.to(device), y.to(device)

    model_args = dict(block_size=block_size, vocab_size=len(vocab), n_layer=n_layer, n_head=n_head,
                      n_embd=n_embd, token_mix=token_mix, dropout=dropout)
    iter_num, best_val, ckpt = 0, float('inf'), None
    if init_from == 'resume':
        ckpt = load_checkpoint(ckpt_path)
        if ckpt['vocab'] != vocab:
            die(f'{ckpt_path} was trained on another vocabulary than {data_path}')
        model_args = ckpt['model_args']  # the shape comes from the checkpoint, not the flags
        iter_num, best_val = ckpt['iter_num'], ckpt['best_val_loss']
        gen.set_state(ckpt['rng_state'])
    elif init_from != 'scratch':
        die(f"--init_from must be 'scratch' or 'resume', got {init_from!r}")
    model = GPT(GPTConfig(**model_args)).to(device)
    # AdamW; weight decay on matrices only, as in nanoGPT / GPT-2 (not on norms, and not on the
    # token mix, whose decay would pull it towards 'see no character' instead of the identity)
    decay = {n: p.dim() >= 2 and n != 'tok_mix' for n, p in model.named_parameters()}
    groups = [{'params': [p for n, p in model.named_parameters() if decay[n]], 'weight_decay': weight_decay},
              {'params': [p for n, p in model.named_parameters() if not decay[n]], 'weight_decay': 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=True)
    if ckpt is not None:
        load_weights(model, ckpt['model'], ckpt_path, 'python gpt.py')
        load_weights(optimizer, ckpt['optimizer'], ckpt_path, 'python gpt.py')
        print(f'resuming from {ckpt_path} at iter {iter_num} (best val loss {best_val:.4f})')
    fwd = torch.compile(model) if compile else model
    ctx = torch.autocast('cuda', dtype=torch.bfloat16) if cuda else torch.autocast('cpu', enabled=False)
    print(f'{model.num_params() / 1e6:.2f}M parameters, {len(splits["train"]):,} train / '
          f'{len(splits["val"]):,} val chars, device {device}')

    def get_lr(it):  # linear warmup, then cosine or linear from learning_rate down to min_lr
        if it < warmup_iters:
            return learning_rate * (it + 1) / warmup_iters
        ratio = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
        min_lr = learning_rate * min_lr_ratio
        left = 0.5 * (1 + math.cos(math.pi * ratio)) if lr_decay == 'cosine' else 1 - ratio  # 1 -> 0
        return min_lr + left * (learning_rate - min_lr)

    @torch.no_grad()
    def estimate_loss():  # mean loss over eval_iters fixed batches per split (same batches every eval)
        model.eval()
        out = {}
        for split in splits:
            g = torch.Generator().manual_seed(seed + 1)
            losses = [fwd(*get_batch(split, g))[1].item() for _ in range(eval_iters)]
            out[split] = sum(losses) / len(losses)
        model.train()
        return out

    tokens_seen, train_time, last_train = 0, 0.0, float('nan')
    x, y = get_batch('train')
    while True:
        if iter_num % eval_interval == 0 or iter_num == max_iters:
            losses = estimate_loss()
            last_train = losses['train']
            print(f'step {iter_num}: train loss {losses["train"]:.4f}, val loss {losses["val"]:.4f}')
            if not math.isfinite(losses['val']):
                die(f'val loss is {losses["val"]} at iter {iter_num}: try a lower --learning_rate; '
                    f'{ckpt_path} keeps the last good model')
            if losses['val'] < best_val:
                best_val = losses['val']
                if iter_num > 0:
                    save_checkpoint({'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                                     'model_args': model_args, 'config': config, 'vocab': vocab,
                                     'iter_num': iter_num, 'best_val_loss': best_val,
                                     'train_loss': last_train, 'rng_state': gen.get_state()}, ckpt_path)
        if iter_num >= max_iters:
            break
        t0 = time.time()
        for group in optimizer.param_groups:
            group['lr'] = get_lr(iter_num)
        with ctx:
            _, loss = fwd(x, y)
        x, y = get_batch('train')                                     # fetch the next batch meanwhile
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        dt = time.time() - t0
        train_time += dt
        tokens_seen += batch_size * block_size
        iter_num += 1
        if iter_num % log_interval == 0:
            lossf = loss.item()
            if not math.isfinite(lossf):
                die(f'loss is {lossf} at iter {iter_num}: try a lower --learning_rate; '
                    f'{ckpt_path} keeps the last good model')
            print(f'iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.1f} ms, '
                  f'{batch_size * block_size / dt:,.0f} tok/s')

    seconds = time.time() - t_start
    model, _, best = load_model(ckpt_path, device=device)             # the best checkpoint:
    val_loss = split_loss(model, splits['val'])                       # its loss on the whole val split
    print(f'best checkpoint (iter {best["iter_num"]}): val loss {val_loss:.4f} on all {len(splits["val"]):,} val chars')
    ctx_ids = torch.tensor([encode('\n', vocab)], device=device)
    sample = model.generate(ctx_ids, sample_chars, generator=torch.Generator(device).manual_seed(seed))
    print('-' * 80 + '\n' + decode(sample[0, 1:], vocab) + '\n' + '-' * 80)
    metrics = {'val_loss': round(val_loss, 4), 'train_loss': round(best['train_loss'], 4), 'iters': iter_num,
               'seconds': round(seconds, 1), 'params': model.num_params(),
               'tokens_per_sec': round(tokens_seen / max(train_time, 1e-9)), 'device': device}
    with open(os.path.join(out_dir, 'gpt.json'), 'w') as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps(metrics))
