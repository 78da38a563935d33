"""
model.py: the networks of minibard (nanoGPT's model.py).

 - GPT: a character-level decoder, pre-norm blocks (GPT-2), rotary positions (RoFormer), a token
   mix of the last few characters (Primer, RWKV), tied embeddings; `generate` samples whole turns
   with a KV cache, per-token log-probs and an end-of-turn stop.
 - log-probs at a temperature and the exact KL over all 65 characters: every step and the ruler
   (frontier.py) compute them here, with the same math.
 - RewardModel: the GPT trunk plus a scalar head on every answer character, summed.
 - loading them, and the policy and reward model an RL step starts from, checked to fit.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import answer_mask, forward_in_chunks
from plumbing import MinibardError, load_checkpoint, load_weights, writer_of


# ------------------------------------------------------------------ the GPT
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
        """AdamW, weight decay on the matrices only (nanoGPT, GPT-2) and not on the token mix: decay
        would pull it towards 'see no character', not the identity it starts as."""
        decay = {n: p.dim() >= 2 and n != 'tok_mix' for n, p in self.named_parameters()}
        params = lambda d: [p for n, p in self.named_parameters() if decay[n] == d]
        groups = [{'params': params(True), 'weight_decay': weight_decay},
                  {'params': params(False), 'weight_decay': 0.0}]
        return torch.optim.AdamW(groups, **adamw)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, stop=None):
        """Sample up to max_new_tokens after idx (B, T) -> out (B, T + n), logprobs (B, n), lengths (B,).

        stop: token ids that end a row (END_OF_TURN encoded), part of its answer; after them the row
        is padded with stop[-1] and log-probability 0; n is the longest row. temperature 0 is argmax;
        logprobs are log pi(y_t) at the temperature (and top_k) y_t was drawn with. Past block_size
        the cache restarts from the last block_size // 2 tokens: every logit is a plain forward over
        the last block_size / 2 to block_size tokens."""
        (B, T), window, dev = idx.shape, self.config.block_size, idx.device
        stop_ids = torch.tensor(stop or [], dtype=idx.dtype, device=dev)
        out = idx.new_full((B, T + max_new_tokens), stop[-1] if stop else 0)
        out[:, :T] = idx
        logps = torch.zeros(B, max_new_tokens, device=dev)
        lengths = torch.full((B,), max_new_tokens, device=dev)
        rows = torch.arange(B, device=dev)  # batch row -> row of out
        live = torch.ones(B, dtype=torch.bool, device=dev)  # rows still writing
        cache = KVCache(self.config, B, dev, self.tok_emb.weight.dtype,
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
            # where, not boolean indexing: nothing here waits for the GPU
            out[rows, T + i] = torch.where(live, nxt, out[rows, T + i])  # a finished row keeps its pad
            logps[rows, i] = torch.where(live, token_logprobs(last, nxt, temperature or 1.0), 0.0)
            if len(stop_ids) and i + 1 >= len(stop_ids):  # rows whose answer now ends in stop
                ended = live & (out[rows, T + i + 1 - len(stop_ids):T + i + 1] == stop_ids).all(1)
                lengths[rows] = torch.where(ended, i + 1, lengths[rows])
                live &= ~ended
            look = not live.is_cuda or i % 8 == 7  # on a GPU each look waits for it: every 8th token
            if i == max_new_tokens - 1 or look and not live.any():
                break
            if look and (~live).sum() * 4 >= len(live):  # a quarter finished: they leave the batch
                rows, nxt, cache = rows[live], nxt[live], cache.select(live)
                live = live[live]
            if cache.pos == window:  # full: re-prefill the last half
                cache.pos = 0
                logits = self(out[rows, T + i + 1 - window // 2:T + i + 1], cache=cache)[0][:, -1]
            else:
                logits = self(nxt[:, None], cache=cache)[0][:, -1]  # one position, O(cache) attention
        n = int(lengths.max()) if B else 0
        return out[:, :T + n], logps[:, :n], lengths


# ------------------------------------------------------------------ generate()'s cache
class KVCache:
    """k, v (n_layer, B, n_head, length <= block_size, head_dim): every layer's keys and values of
    the `pos` tokens seen so far; emb_tail (B, token_mix - 1, C): the last embeddings, for the next
    token's mix."""
    def __init__(self, config, B, device, dtype, length=None):
        hd = config.n_embd // config.n_head
        shape = (config.n_layer, B, config.n_head, length or config.block_size, hd)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.emb_tail, self.pos = None, 0

    def select(self, keep):
        """Keep the batch rows where keep (B,) is True (finished answers leave the batch)."""
        shape = self.k.shape[:1] + (int(keep.sum()),) + self.k.shape[2:]
        k, v = self.k.new_empty(shape), self.v.new_empty(shape)
        k[..., :self.pos, :] = self.k[:, keep, :, :self.pos]
        v[..., :self.pos, :] = self.v[:, keep, :, :self.pos]
        self.k, self.v = k, v
        self.emb_tail = self.emb_tail[keep] if self.emb_tail is not None else None
        return self


# ------------------------------------------------------------------ log-probs and the exact KL
def log_probs(logits, temperature=1.0):
    """log softmax(logits / temperature) over the characters, in fp32: (..., V) -> (..., V). Computed
    only here: sampling, PPO, the entropy and the exact KL share the math and the temperature
    (Huang et al., "The N implementation details of RLHF", detail 2)."""
    return F.log_softmax(logits.float() / max(temperature, 1e-8), dim=-1)


def token_logprobs(logits, tokens, temperature=1.0):
    """log pi(token | context) under softmax(logits / temperature): (B, T, V), (B, T) -> (B, T)."""
    return log_probs(logits, temperature).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def answer_logits(logits, prompt_len):
    """The logits that predict the answer's tokens (t - 1 predicts t): (B, Tp + Ta, V) -> (B, Ta, V)."""
    return logits[:, prompt_len - 1:-1]


def exact_kl(logits_p, logits_q, temperature=1.0):
    """Per-position KL(p || q) = sum_v p(v) (log p(v) - log q(v)) over the vocabulary: (..., V) -> (...)."""
    logp, logq = log_probs(logits_p, temperature), log_probs(logits_q, temperature)
    return (logp.exp() * (logp - logq)).sum(-1)


# ------------------------------------------------------------------ the reward model
class RewardModel(nn.Module):
    """r(x, y) = b + sum_t w . h_t over the answer's characters t up to its end: the GPT trunk plus
    a scalar head. After t characters the sum scores the answer so far, which PPO's critic reuses.

    Why summed, not InstructGPT's single head on the last token: a word-counting labeler scores a
    sum over positions, so this head only learns what each stretch of text adds, not also where
    to look. It reads the prompt's last `context` characters and the answer (past the block: its
    last block_size characters)."""
    def __init__(self, config, context=0):
        super().__init__()
        self.context = context  # prompt characters the RM reads
        self.trunk = GPT(config)
        self.head = nn.Linear(config.n_embd, 1, bias=False)
        nn.init.zeros_(self.head.weight)  # r = 0: no preference
        self.bias = nn.Parameter(torch.zeros(()))  # b: Bradley-Terry ignores it; set by normalisation

    def contributions(self, seqs, prompt_len):
        """Each answer character's share c_t = w . h_t: seqs (B, Tp + Ta) -> (B, Ta), or (B, block_size)
        past the block."""
        start = max(0, prompt_len - self.context, seqs.size(1) - self.trunk.config.block_size)
        h = self.trunk.hidden(seqs[:, start:])  # (B, T', C)
        with torch.autocast('cpu', enabled=False):  # the head in fp32 under bf16 training: a
            return self.head(h[:, max(0, prompt_len - start):].float()).squeeze(-1)  # bf16 c_t loses credit

    def forward(self, seqs, prompt_len, lengths=None):
        """r = b + sum of c_t over each answer up to its length: seqs (B, Tp + Ta), lengths (B,)
        (None: all Ta characters are answer) -> scores (B,)."""
        read = seqs.size(1) - max(0, prompt_len - self.context)  # characters the trunk would read
        if lengths is not None and len(seqs) > 1 and read > self.trunk.config.block_size:
            # past the block each answer is read over the window before its own end: one row at a
            # time (only sample mode writes past the block; training and PPO stay within it)
            return torch.cat([self(seqs[i:i + 1, :prompt_len + int(lengths[i])], prompt_len, lengths[i:i + 1])
                              for i in range(len(seqs))])
        c = self.contributions(seqs, prompt_len)  # (B, Ta') the last Ta' answer characters
        if lengths is not None:  # padding after an answer's end adds nothing
            c = c * answer_mask(lengths, seqs.size(1) - prompt_len)[:, -c.size(1):]
        return c.sum(1) + self.bias


def rm_scores(rm, seqs, prompt_len, lengths=None, chunk=32):
    """The RM's scores (N,) of prompt + answer sequences (N, Tp + Ta), answer lengths (N,) (None: all
    Ta), on its device in chunks (data.forward_in_chunks). Differentiable: wrap evaluation and
    rewards in torch.no_grad()."""
    device = next(rm.parameters()).device
    if lengths is None:
        lengths = torch.full((len(seqs),), seqs.size(1) - prompt_len)
    forward = lambda s, n: rm(s.to(device), prompt_len, n.to(device))
    return forward_in_chunks(forward, seqs, lengths, prompt_len, chunk)


# ------------------------------------------------------------------ loading
def load_gpt(path, writer=None, device='cpu', stale_ok=False):
    """(GPT in eval mode, vocab, checkpoint dict) from a checkpoint of gpt.py, sft.py, ppo.py or dpo.py."""
    writer = writer or writer_of(path)
    checkpoint = load_checkpoint(path, writer, 'GPT', stale_ok)
    model = build(GPT, checkpoint, path, writer)
    return model.to(device).eval(), checkpoint['vocab'], checkpoint


def build(kind, checkpoint, path, writer, *args):
    """kind(GPTConfig(**model_args), *args) with the checkpoint's weights in it, else MinibardError."""
    try:
        model = kind(GPTConfig(**checkpoint['model_args']), *args)
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError) as e:
        raise MinibardError(f'{path} has settings no model can be built from ({e}): {writer} writes it anew')
    load_weights(model, checkpoint['model'], path, writer)
    return model


def load_reward_model(path, device='cpu', stale_ok=False):
    """(RewardModel in eval mode, vocab, checkpoint dict) from out/reward.pt."""
    checkpoint = load_checkpoint(path, 'python reward.py', 'reward model', stale_ok)
    rm = build(RewardModel, checkpoint, path, 'python reward.py', checkpoint['rm_context'])
    return rm.to(device).eval(), checkpoint['vocab'], checkpoint


def load_policy_and_rm(path, rm_path, device='cpu', stale_ok=False):
    """The policy GPT and its reward model, as the RL steps, DPO and the chat start: (model, vocab,
    its checkpoint, rm, its checkpoint). MinibardError unless the RM has the policy's shape and vocab."""
    model, vocab, checkpoint = load_gpt(path, device=device, stale_ok=stale_ok)
    rm, rm_vocab, rm_checkpoint = load_reward_model(rm_path, device, stale_ok)
    shape = lambda c: {**c['model_args'], 'dropout': 0}
    if rm_vocab != vocab or shape(rm_checkpoint) != shape(checkpoint):
        raise MinibardError(f'{rm_path} was not trained from {path} (another vocabulary or shape): run '
                            f'python reward.py --policy={os.path.basename(path)} again')
    return model, vocab, checkpoint, rm, rm_checkpoint
