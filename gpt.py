"""
gpt.py: a character-level GPT, pretrained on Tiny Shakespeare. Step 1 of minibard.

This file is also the library every later step imports: the model (`GPTConfig`, `GPT`,
`generate` with a KV cache and per-token log-probabilities), the char codec, the
`--key=value` override parser and the checkpoint helpers. Importing it only defines things;
training happens under `if __name__ == '__main__':`.

Run:
    python gpt.py                        # CPU: ~2.5 min on 2 cores, val loss ~1.55
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
import re
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------
# hyperparameters (plain globals; `--key=value` overrides any of them, see configure())
_gpu = torch.cuda.is_available()  # CPU and GPU get different default sizes (underscore: not a flag)
device = 'cuda' if _gpu else 'cpu'  # 'cpu', 'cuda', 'cuda:1', ...: a device this machine has
out_dir = 'out'                 # where checkpoints and metrics go
data_path = 'input.txt'         # Tiny Shakespeare, 1,115,394 chars; first 90% train
init_from = 'scratch'           # in {'scratch', 'resume'}: resume continues from out_dir/gpt.pt
seed = 1337                     # in [0, inf): same seed + same settings = same losses on CPU
# model
n_layer = 6 if _gpu else 2      # in [1, inf): depth; on 2 cores fewer layers, more steps win (README)
n_head = 6 if _gpu else 4       # in [1, inf): attention heads; n_embd must divide by it
n_embd = 384 if _gpu else 128   # in [2, inf): width (head size n_embd / n_head even: rotary)
token_mix = 3                   # in [1, inf): input at t mixes the last this many chars (1 = off)
block_size = 256                # in [2, inf): context in characters (RLHF: prompt + a turn fit)
dropout = 0.2 if _gpu else 0.0  # in [0, 1): the small CPU model underfits: dropout only costs it
# optimisation: AdamW, linear warmup, then decay to min_lr (cosine: nanoGPT's schedule)
batch_size = 64 if _gpu else 3  # in [1, inf): sequences per step: on 2 cores, steps count
max_iters = 5000 if _gpu else 6000  # in [0, inf): CPU: ~140 s of steps on 2 cores
learning_rate = 1e-3 if _gpu else 3e-3  # in (0, inf): a tiny model takes a high lr
min_lr_ratio = 0.1 if _gpu else 0.0  # in [0, 1]: decay ends at lr * this (0 won 0.015 on CPU)
lr_decay = 'cosine' if _gpu else 'linear'  # in {'cosine', 'linear'}: linear won 0.008 (Bergsma et al. 2025)
warmup_iters = 100              # in [0, inf): short warmup: tiny models tolerate a high lr early
weight_decay = 0.1              # in [0, inf): on matrices only (not norms, not biases)
beta1, beta2 = 0.9, 0.99        # in [0, 1): beta2 0.99 as nanoGPT's shakespeare_char: few tokens/step
grad_clip = 1.0                 # in [0, inf): clip the global grad norm (0 = off)
# evaluation and logging
eval_interval = 250 if _gpu else 1000  # in [1, inf): estimate train/val loss every this many iters
eval_iters = 200 if _gpu else 20      # in [1, inf): batches per estimate (final: the whole val split)
log_interval = 100              # in [1, inf): print an iter line every this many iters
sample_chars = 500              # in [0, inf): length of the sample printed at the end
compile = False                 # torch.compile (worth it on GPU; CPU compile costs more)
# ----------------------------------------------------------------------------------------


def die(msg):
    """A user mistake: one line saying what to do, non-zero exit, no traceback."""
    print(f'error: {msg}', file=sys.stderr)
    sys.exit(1)


def _exit_in_one_line(kind, value, tb, default=sys.excepthook):
    """Ctrl-C or running out of memory anywhere: one line, no traceback. Checkpoints are only
    ever replaced whole (see save_checkpoint), so whatever was saved before is intact."""
    if issubclass(kind, KeyboardInterrupt):
        print('interrupted: stopped; checkpoints saved before now are intact', file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)
    if issubclass(kind, BrokenPipeError):                             # `python gpt.py --help | head`
        os._exit(141)
    if issubclass(kind, MemoryError) or 'out of memory' in str(value) or "can't allocate memory" in str(value):
        print('error: out of memory: lower the sizes (batch_size, best_of, num_samples, ...); checkpoints saved '
              'before now are intact', file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    default(kind, value, tb)


def configure(g, argv):
    """Apply `--key=value` overrides to the globals `g` of a script; return the options as a dict.

    The options are the names of the script's hyperparameter block (see option_block; a dict
    without a __file__: its plain values). The value is read as a Python literal (`--lr=3e-4`,
    `--top_k=None`, `--start='ROMEO:'`), falling back to the raw string. Its type must match the
    default's (an int is accepted for a float); a default of None accepts anything. Unknown keys
    name the closest one. -h / --help prints the options and exits.
    """
    sys.excepthook = _exit_in_one_line
    block = option_block(g['__file__']) if '__file__' in g else None
    if block is not None:
        keys = [n for names, _ in block for n in names]
    else:
        keys = [k for k, v in g.items() if not k.startswith('_') and isinstance(v, (bool, int, float, str, type(None)))]
    if '-h' in argv or '--help' in argv:
        print_help(g, block)
        sys.exit(0)
    for arg in argv:
        if not arg.startswith('--') or '=' not in arg:
            die(f'cannot read argument {arg!r}: overrides look like --key=value (--help lists them)')
        key, text = arg[2:].split('=', 1)
        if key not in keys:
            near = ([k for k in keys if ''.join(w[0] for w in k.split('_')) == key]   # --lr: learning_rate
                    or difflib.get_close_matches(key, keys, n=1, cutoff=0.0))        # else the closest
            die(f'unknown option --{key}; did you mean --{near[0]}? (--help lists the options)')
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        old = g[key]
        if isinstance(old, float) and type(value) is int:
            value = float(value)
        if old is not None and type(value) is not type(old):        # (None only where the default is None)
            die(f'--{key} expects {type(old).__name__} (default {old!r}), got {text!r}')
        g[key] = value
    if block is not None:                                          # every option against its rule
        for names, comment in block:
            for n in names:
                check_option(n, g[n], comment)
    if 'device' in keys:
        check_device(g['device'])
    return {k: g[k] for k in keys}


# An option's rule opens its comment in the hyperparameter block: `in [1, inf)`, `in (0, 1]`,
# `in {'scratch', 'resume'}`, with `or None` where None is allowed and the type first where the
# default is None (`int in [1, inf) or None`). A string without a set must not be empty.
RULE = re.compile(r"^(?:(int|float) )?in ([\[(][^\])]*[\])]|\{[^}]*\})( or None)?")


def check_option(name, value, comment):
    """die() unless value keeps the rule at the start of the option's comment."""
    m = RULE.match(comment)
    if m is None:
        if isinstance(value, str) and not value:
            die(f'--{name} is empty')
        return
    kind, allowed, none_ok = m.groups()
    if value is None:
        if not none_ok:
            die(f'--{name}=None is not allowed: {m.group(0)}')
        return
    number = isinstance(value, (int, float) if kind == 'float' else int) and not isinstance(value, bool)
    if kind and not number:
        die(f'--{name} expects {kind} or None, got {value!r}')
    if allowed.startswith('{'):
        ok = value in ast.literal_eval(allowed)
    else:                                                          # [lo, hi], (lo, hi), or half-open
        lo, hi = (float(b) for b in allowed[1:-1].split(','))
        above = lo <= value if allowed[0] == '[' else lo < value
        ok = above and (value <= hi if allowed[-1] == ']' else value < hi)
    if not ok:
        die(f"--{name}={value!r} is out of range: it must be in {allowed}{none_ok or ''}")


def check_device(device):
    """die() unless `device` names a device this machine has."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        die(f"--device={device!r} is not a device: use 'cpu' or 'cuda'")
    if kind == 'cuda' and not torch.cuda.is_available():
        die(f'--device={device!r}: this machine has no CUDA GPU; use --device=cpu')
    if kind == 'cuda' and (torch.device(device).index or 0) >= torch.cuda.device_count():
        die(f'--device={device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)')
    if kind == 'mps' and not torch.backends.mps.is_available():
        die(f'--device={device!r}: this machine has no MPS; use --device=cpu')
    if kind not in ('cpu', 'cuda', 'mps'):
        die(f"--device={device!r} is not supported: use 'cpu' or 'cuda'")


def option_block(path):
    """The hyperparameter block of a script, between '# hyperparameters' and the next '# ----'
    line: [(option names, comment)] per line; a comment line alone names a group (no names)."""
    with open(path, encoding='utf-8') as f:
        block = f.read().split('\n# hyperparameters', 1)[1].split('\n# ----', 1)[0].splitlines()[1:]
    rows = []
    for line in block:
        code, _, comment = line.partition('#')                    # (no '#' inside a default value)
        names = [n.strip() for n in code.split('=')[0].split(',') if not n.strip().startswith('_')]
        if names or not code.strip():                              # (_gpu is not an option)
            rows.append((names if code.strip() else [], comment.strip()))
    return rows


def print_help(g, block):
    """-h / --help: the script's purpose, every option as `--name=value  comment` (values as in
    force on this machine, grouped as the block's comment lines group them), the usage lines."""
    doc, name = (g.get('__doc__') or '').strip(), os.path.basename(g['__file__'])
    print(doc.splitlines()[0] if doc else name)
    print('\noptions (--key=value; the value is read as a Python literal):')
    for names, comment in block:
        if names:
            opts = '  '.join(f'--{n}={g[n]!r}' for n in names)
            print(f'  {opts:<34} {comment}'.rstrip())
        elif comment:                                              # a group's name
            print(f'  {comment}:')
    usage = [l.strip().removeprefix('Run:').strip() for l in doc.splitlines() if f'python {name}' in l]
    if usage:
        print('\nusage:\n' + '\n'.join(f'  {u}' for u in usage))


def count(done, total):
    """'1200/6000 (20%)': where a run is."""
    return f'{done}/{total} ({100 * done // max(total, 1)}%)'


def eta(done, total, t0, start=0):
    """'eta 2m51s': the time left at the pace so far, the wall time since t0 over the
    done - start units covered since then."""
    m, s = divmod(round((time.time() - t0) / max(done - start, 1) * (total - done)), 60)
    return f'eta {m}m{s:02d}s'


def progress(name, total, every, log=print):
    """A counter for work done in pieces (generate() calls): done(n) adds n of total and logs
    '<name> 4096/23200 (17%), eta 0m41s' once `every` units have passed, and at the end."""
    t0, seen = time.time(), [0]

    def done(n):
        seen[0] += n
        if seen[0] % every < n or seen[0] == total:
            log(f'{name} {count(seen[0], total)}, {eta(seen[0], total, t0)}')
    return done


# ------------------------------------------------------------------ the char codec
END_OF_TURN = '\n\n'  # a speech ends with a blank line before the next speaker, as in input.txt


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
    """Keys and values of every layer for the tokens seen so far, preallocated to `length`
    (at most block_size) positions.

    k, v: (n_layer, B, n_head, length, head_dim); `pos` tokens are filled. A forward
    with a cache writes the new keys at pos.. and attends over the first pos + T of them.
    emb_tail: (B, token_mix - 1, C), the last embeddings, for the token mix of the next input.
    """
    def __init__(self, config, B, device, dtype, length=None):
        shape = (config.n_layer, B, config.n_head, length or config.block_size, config.n_embd // config.n_head)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.emb_tail = None
        self.pos = 0

    def select(self, keep):
        """Keep only the batch rows where keep (B,) is True (finished answers leave the batch)."""
        k, v = self.k.new_empty(self.k.shape[:1] + (int(keep.sum()),) + self.k.shape[2:]), self.v.new_empty(
            self.v.shape[:1] + (int(keep.sum()),) + self.v.shape[2:])
        k[..., :self.pos, :], v[..., :self.pos, :] = self.k[:, keep, :, :self.pos], self.v[:, keep, :, :self.pos]
        self.k, self.v = k, v
        self.emb_tail = self.emb_tail[keep] if self.emb_tail is not None else None
        return self


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
        if T == 1 and cache is not None:  # one query: two small matmuls beat the CPU flash kernel by ~25%
            y = torch.softmax((q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5, -1) @ v       # (B, nh, 1, hd)
        else:
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
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, stop=None):
        """Sample up to max_new_tokens after idx (B, T) -> out (B, T + n), logprobs (B, n), lengths (B,).

        stop: token ids that end a row (the end of a turn, encode('\\n\\n')). A row ends right after
        them (they are part of its answer), its length is counted up to there, and it is padded
        with stop[-1] and log-probability 0 after; n is the longest row. Without stop every row gets
        max_new_tokens. temperature 0 is argmax. logprobs are log pi(y_t) under the same
        temperature (and top_k) the token was drawn with.

        A KV cache makes each new token cost one position, not T. Finished rows are dropped from
        the batch (and the cache) once they are a quarter of it, so a long answer does not make
        the short ones cost more. Past block_size the cache is full, so it restarts from the last
        block_size // 2 tokens (one batched prefill) and goes on: every logit equals a plain
        forward over a window of block_size / 2 to block_size tokens (test_all.py checks it).
        """
        bs, B, T = self.config.block_size, idx.size(0), idx.size(1)
        stop_ids = torch.tensor(stop or [], dtype=idx.dtype, device=idx.device)
        out = idx.new_full((B, T + max_new_tokens), stop[-1] if stop else 0)
        out[:, :T] = idx
        logps = torch.zeros(B, max_new_tokens, device=idx.device)
        lengths = torch.full((B,), max_new_tokens, device=idx.device)
        rows = torch.arange(B, device=idx.device)                    # batch row -> row of out
        live = torch.ones(B, dtype=torch.bool, device=idx.device)    # rows of the batch still writing
        cache = KVCache(self.config, B, idx.device, self.tok_emb.weight.dtype, min(bs, T + max_new_tokens))
        logits = self(idx[:, -bs:], cache=cache)[0][:, -1]            # prefill the (cropped) prompt
        for i in range(max_new_tokens):
            last = logits.float()                                     # (R, V)
            if top_k is not None:                                     # keep the k largest, -inf elsewhere
                kth = torch.topk(last, min(top_k, last.size(-1))).values[:, [-1]]
                last = last.masked_fill(last < kth, float('-inf'))
            if temperature == 0:
                nxt = last.argmax(-1)                                 # (R,)
            else:
                nxt = torch.multinomial(F.softmax(last / temperature, dim=-1), 1, generator=generator)[:, 0]
            out[rows[live], T + i] = nxt[live]
            logps[rows[live], i] = token_logprobs(last[live], nxt[live], temperature or 1.0)
            if len(stop_ids) and i + 1 >= len(stop_ids):              # rows whose answer now ends in stop
                ended = live & (out[rows, T + i + 1 - len(stop_ids):T + i + 1] == stop_ids).all(1)
                lengths[rows[ended]] = i + 1
                live &= ~ended
            if i == max_new_tokens - 1 or not live.any():
                break
            if (~live).sum() * 4 >= len(live):                        # drop finished rows from the batch
                rows, nxt, cache = rows[live], nxt[live], cache.select(live)
                live = live[live]
            if cache.pos == bs:                                       # full: re-prefill the last bs//2
                cache.pos = 0
                logits = self(out[rows, T + i + 1 - bs // 2:T + i + 1], cache=cache)[0][:, -1]
            else:
                logits = self(nxt[:, None], cache=cache)[0][:, -1]   # one position, O(cache) attention
        n = int(lengths.max()) if B else 0
        return out[:, :T + n], logps[:, :n], lengths


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
    if os.path.isdir(path):
        die(f'{path} is a folder, not a text file')
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except UnicodeDecodeError as e:
        die(f'{path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}): use a plain text file')
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


def lr_at(it, lr, warmup, total, min_ratio, decay):
    """The learning rate at iteration it: linear warmup over `warmup` iterations, then 'cosine'
    or 'linear' decay from lr to lr * min_ratio at iteration `total` (held there after it)."""
    if it < warmup:
        return lr * (it + 1) / warmup
    ratio = min(1.0, (it - warmup) / max(1, total - warmup))
    left = 0.5 * (1 + math.cos(math.pi * ratio)) if decay == 'cosine' else 1 - ratio  # 1 -> 0
    return lr * min_ratio + left * (lr - lr * min_ratio)


# ------------------------------------------------------------------ pretraining
if __name__ == '__main__':
    config = configure(globals(), sys.argv[1:])                      # each option against its rule, then:
    if max_iters == 0 and init_from == 'scratch':
        die('--max_iters=0 from scratch trains nothing: give it some iterations, or add --init_from=resume '
            'to re-measure out_dir/gpt.pt')
    if n_embd % n_head or (n_embd // n_head) % 2:
        die(f'--n_embd={n_embd} must split into --n_head={n_head} heads of an even size (rotary pairs)')
    t_start = time.time()
    cuda = torch.device(device).type == 'cuda'                      # also 'cuda:1'
    prepare_out_dir(out_dir)
    torch.manual_seed(seed)
    train_data, val_data, vocab = load_splits(data_path)
    splits = {'train': train_data, 'val': val_data}
    if block_size >= len(val_data):
        die(f'--block_size={block_size} is not shorter than the validation text ({len(val_data):,} chars)')
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
    t_loop, start_iter = time.time(), iter_num                        # the pace for the eta
    x, y = get_batch('train')
    while True:
        if iter_num % eval_interval == 0 or iter_num == max_iters:
            losses = estimate_loss()
            last_train = losses['train']
            print(f'step {iter_num}: train loss {losses["train"]:.4f}, val loss {losses["val"]:.4f}'
                  + (f', {eta(iter_num, max_iters, t_loop, start_iter)}' if iter_num > start_iter else ''))
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
            group['lr'] = lr_at(iter_num, learning_rate, warmup_iters, max_iters, min_lr_ratio, lr_decay)
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
            print(f'iter {count(iter_num, max_iters)}: loss {lossf:.4f}, time {dt * 1000:.1f} ms, '
                  f'{batch_size * block_size / dt:,.0f} tok/s, {eta(iter_num, max_iters, t_loop, start_iter)}')

    seconds = time.time() - t_start
    model, _, best = load_model(ckpt_path, device=device)             # the best checkpoint:
    val_loss = split_loss(model, splits['val'])                       # its loss on the whole val split
    print(f'best checkpoint (iter {best["iter_num"]}): val loss {val_loss:.4f} on all {len(splits["val"]):,} val chars')
    ctx_ids = torch.tensor([encode('\n', vocab)], device=device)
    sample = model.generate(ctx_ids, sample_chars, generator=torch.Generator(device).manual_seed(seed))[0]
    print('-' * 80 + '\n' + decode(sample[0, 1:], vocab) + '\n' + '-' * 80)
    metrics = {'val_loss': round(val_loss, 4), 'train_loss': round(best['train_loss'], 4), 'iters': iter_num,
               'seconds': round(seconds, 1), 'params': model.num_params(),
               'tokens_per_sec': round(tokens_seen / max(train_time, 1e-9)), 'device': device}
    with open(os.path.join(out_dir, 'gpt.json'), 'w') as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps(metrics))
