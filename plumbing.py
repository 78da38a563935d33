"""
plumbing.py: what every minibard script needs and none of them is about.

The recipe lives in gpt.py, reward.py, ppo.py and sample.py (and the labeler and the evaluation
they share, labeler.py and frontier.py); this file holds the parts a reader can take on trust:
 - options: `--key=value` overrides, each checked against the rule that opens its comment in the
   hyperparameter block (`# in [1, inf): ...`, `# in (0, 1]`, `# in {'a', 'b'}`, `# int in [1, inf)
   or None`: a range or a set, the type first where the default is None; see RULE), --help, and
   one-line errors instead of tracebacks (MinibardError; die in a script's own checks);
 - progress lines with an ETA; atomic checkpoints, read with weights_only=True; results kept
   in a file for as long as what they depend on is unchanged (cached); which checkpoint a
   name means (checkpoint_path);
 - the corpus: input.txt read and checked, the character codec, the train/val split, random
   training windows, the learning-rate schedule;
 - turns: speech starts as prompts, and batched sampling of one turn per prompt, padded after
   its end; in the chat, the scene as a prompt and where a drawn answer's turn ends (end_of_turn)
   and how much of it is shown (whole).
It imports only torch, so every script can import it first.
"""
import ast
import difflib
import hashlib
import json
import math
import os
import re
import sys
import time

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------ options and errors
class MinibardError(ValueError):
    """A mistake a user can fix (a bad option, a missing or wrong checkpoint, a character the model
    does not know): its message is one line that says what to do. Every function here raises it;
    a script that called configure() turns it into that `error:` line and exit code 1."""


def die(msg):
    """For a script's own checks, under `if __name__ == '__main__':` only: one line saying what to
    do, non-zero exit, no traceback. (Imported code raises MinibardError instead.)"""
    print(f'error: {msg}', file=sys.stderr)
    sys.exit(1)


def _exit_in_one_line(kind, value, tb, default=sys.excepthook):
    """A MinibardError, Ctrl-C or running out of memory anywhere in a script: one line, no
    traceback (Python then exits with code 1). Checkpoints are only ever replaced whole (see
    save_checkpoint), so whatever was saved before is intact."""
    if issubclass(kind, MinibardError):
        print(f'error: {value}', file=sys.stderr)
        return
    if issubclass(kind, KeyboardInterrupt):
        print('interrupted: stopped; checkpoints saved before now are intact', file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)
    if issubclass(kind, BrokenPipeError):  # `python gpt.py --help | head`
        os._exit(141)
    oom = any(words in str(value) for words in ('out of memory', "can't allocate memory"))  # torch's words
    if issubclass(kind, MemoryError) or oom:
        print('error: out of memory: lower the sizes (batch_size, best_of, num_samples, ...); checkpoints '
              'saved before now are intact', file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    default(kind, value, tb)


class ByDevice:
    """A default that depends on the device of the run: `n_layer = ByDevice(cpu=2, cuda=6)`.
    configure() puts the value for the run's --device in its place (cuda: the cuda value; cpu
    and mps: the cpu value) before any other override is read, so `--device=cpu` on a GPU machine
    gets the CPU sizes and `--device=cuda` the GPU sizes."""
    def __init__(self, cpu, cuda):
        self.cpu, self.cuda = cpu, cuda

    def __repr__(self):
        return f'ByDevice(cpu={self.cpu!r}, cuda={self.cuda!r})'


def resolve_defaults(scope, device):
    """Every ByDevice default of `scope` replaced by its value for `device` ('cpu', 'cuda:1', ...)."""
    gpu = torch.device(device).type == 'cuda'
    for k, v in scope.items():
        if isinstance(v, ByDevice):
            scope[k] = v.cuda if gpu else v.cpu


def configure(scope, argv):
    """Apply `--key=value` overrides to a script's globals `scope`; return the options as a dict.

    The options are the names of the script's hyperparameter block (see option_block; a dict
    without a __file__: its plain values). The value is read as a Python literal (`--lr=3e-4`,
    `--top_k=None`, `--start='ROMEO:'`), falling back to the raw string. Its type must match the
    default's (an int is accepted for a float); a default of None accepts anything. Unknown keys
    name the closest one, or the new name of one listed in the script's `_renamed`. The --device
    override comes first: the defaults that depend on it (ByDevice) follow it. -h / --help prints
    the options (as on the device given) and exits.
    """
    sys.excepthook = _exit_in_one_line
    block = option_block(scope['__file__']) if '__file__' in scope else None
    if block is not None:
        keys = [n for names, _ in block for n in names]
    else:
        plain = (bool, int, float, str, type(None))
        keys = [k for k, v in scope.items() if not k.startswith('_') and isinstance(v, plain)]
    if 'device' in scope:
        given = [literal(a.split('=', 1)[1]) for a in argv if a.startswith('--device=')]
        scope['device'] = given[-1] if given else scope['device']
        check_device(scope['device'])
        resolve_defaults(scope, scope['device'])
    if '-h' in argv or '--help' in argv:
        print_help(scope, block)
        sys.exit(0)
    for arg in argv:
        if not arg.startswith('--') or '=' not in arg:
            raise MinibardError(f'cannot read argument {arg!r}: overrides look like --key=value '
                                '(--help lists them)')
        key, text = arg[2:].split('=', 1)
        if key in scope.get('_renamed', {}):
            new = scope['_renamed'][key]
            raise MinibardError(f"--{key} is now --{new} (PPO's options follow cleanrl's names, and TRL's "
                                'where cleanrl has none)')
        if key not in keys:
            near = ([k for k in keys if ''.join(w[0] for w in k.split('_')) == key]  # --lr: learning_rate
                    or [k for k in keys if key in k]  # --lam: gae_lambda
                    or difflib.get_close_matches(key, keys, n=1, cutoff=0.0))  # else the closest
            raise MinibardError(f'unknown option --{key}; did you mean --{near[0]}? '
                                '(--help lists the options)')
        value, old = literal(text), scope[key]
        if isinstance(old, float) and type(value) is int:
            value = float(value)
        if old is not None and type(value) is not type(old):  # (None only where the default is None)
            raise MinibardError(f'--{key} expects {type(old).__name__} (default {old!r}), got {text!r}')
        scope[key] = value
    if block is not None:  # every option against its rule
        for names, comment in block:
            for n in names:
                check_option(n, scope[n], comment)
    return {k: scope[k] for k in keys}


def literal(text):
    """An override's value: a Python literal (`3e-4`, `None`, `'ROMEO:'`), or else the raw string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# An option's rule opens its comment in the hyperparameter block: `in [1, inf)`, `in (0, 1]`,
# `in {'scratch', 'resume'}`, with `or None` where None is allowed and the type first where the
# default is None (`int in [1, inf) or None`). A string without a set must not be empty.
RULE = re.compile(r"^(?:(int|float) )?in ([\[(][^\])]*[\])]|\{[^}]*\})( or None)?")


def check_option(name, value, comment):
    """die() unless value keeps the rule at the start of the option's comment."""
    rule = RULE.match(comment)
    if rule is None:
        if isinstance(value, str) and not value:
            raise MinibardError(f'--{name} is empty')
        return
    kind, allowed, none_ok = rule.groups()
    if value is None:
        if not none_ok:
            raise MinibardError(f'--{name}=None is not allowed: {rule.group(0)}')
        return
    number = isinstance(value, (int, float) if kind == 'float' else int) and not isinstance(value, bool)
    if kind and not number:
        raise MinibardError(f'--{name} expects {kind} or None, got {value!r}')
    if allowed.startswith('{'):
        ok = value in ast.literal_eval(allowed)
    else:  # [lo, hi], (lo, hi), or half-open
        lo, hi = (float(b) for b in allowed[1:-1].split(','))
        above = lo <= value if allowed[0] == '[' else lo < value
        ok = above and (value <= hi if allowed[-1] == ']' else value < hi)
    if not ok:
        raise MinibardError(f"--{name}={value!r} is out of range: it must be in {allowed}{none_ok or ''}")


def check_device(device):
    """die() unless `device` names a device this machine has."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise MinibardError(f"--device={device!r} is not a device: use 'cpu' or 'cuda'")
    if kind == 'cuda' and not torch.cuda.is_available():
        raise MinibardError(f'--device={device!r}: this machine has no CUDA GPU; use --device=cpu')
    if kind == 'cuda' and (torch.device(device).index or 0) >= torch.cuda.device_count():
        raise MinibardError(f'--device={device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)')
    if kind == 'mps' and not torch.backends.mps.is_available():
        raise MinibardError(f'--device={device!r}: this machine has no MPS; use --device=cpu')
    if kind not in ('cpu', 'cuda', 'mps'):
        raise MinibardError(f"--device={device!r} is not supported: use 'cpu' or 'cuda'")


def option_block(path):
    """The hyperparameter block of a script, between '# hyperparameters' and the next '# ----'
    line: [(option names, comment)] per line; a comment line alone names a group (no names)."""
    with open(path, encoding='utf-8') as f:
        block = f.read().split('\n# hyperparameters', 1)[1].split('\n# ----', 1)[0].splitlines()[1:]
    rows = []
    for line in block:
        code, _, comment = line.partition('#')  # (no '#' inside a default value)
        names = [n.strip() for n in code.split('=')[0].split(',') if not n.strip().startswith('_')]
        if names or not code.strip():  # (_names are not options)
            rows.append((names if code.strip() else [], comment.strip()))
    return rows


def print_help(scope, block):
    """-h / --help: the script's purpose, every option as `--name=value  comment` (values as in
    force on this machine, grouped as the block's comment lines group them), the usage lines."""
    doc, name = (scope.get('__doc__') or '').strip(), os.path.basename(scope['__file__'])
    print(doc.splitlines()[0] if doc else name)
    print('\noptions (--key=value; the value is read as a Python literal):')
    for names, comment in block:
        if names:
            opts = '  '.join(f'--{n}={scope[n]!r}' for n in names)
            print(f'  {opts:<34} {comment}'.rstrip())
        elif comment:  # a group's name
            print(f'  {comment}:')
    usage = [l.strip().removeprefix('Run:').strip() for l in doc.splitlines() if f'python {name}' in l]
    if usage:
        print('\nusage:\n' + '\n'.join(f'  {u}' for u in usage))


# ------------------------------------------------------------------ progress
def count(done, total):
    """'1200/6000 (20%)': where a run is."""
    return f'{done}/{total} ({100 * done // max(total, 1)}%)'


def eta(done, total, t0, start=0):
    """'eta 2m51s': the time left at the pace so far, the wall time since t0 over the
    done - start units covered since then."""
    m, s = divmod(round((time.time() - t0) / max(done - start, 1) * (total - done)), 60)
    return f'eta {m}m{s:02d}s'


def progress(name, total, every, log=print):
    """A counter for work done in pieces (generate() calls): advance(n) adds n of total and logs
    '<name> 4096/23200 (17%), eta 0m41s' once `every` units have passed, and at the end."""
    t0, seen = time.time(), [0]

    def advance(n):
        seen[0] += n
        if seen[0] % every < n or seen[0] == total:
            log(f'{name} {count(seen[0], total)}, {eta(seen[0], total, t0)}')
    return advance


# ------------------------------------------------------------------ files
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


def digest(x):
    """A short fingerprint of a file (a path) or a tensor's values: what a cached result depends on."""
    h = hashlib.sha256()
    if isinstance(x, torch.Tensor):
        h.update(str((x.dtype, tuple(x.shape))).encode() + x.detach().cpu().contiguous().numpy().tobytes())
    else:
        with open(x, 'rb') as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def cached(path, key, compute, log=print):
    """compute() -> a json-able result, kept in the json file `path` under `key` (a dict of what the
    result depends on, digests of files among them): a later call with the same key reads it back
    instead of computing it again. The file is written atomically; a corrupt one is recomputed."""
    key = json.dumps(key, sort_keys=True)
    try:
        with open(path) as f:
            store = json.load(f)
    except (OSError, ValueError):
        store = {}
    if key in store:
        log(f'(measured before with the same models, prompts and settings: read from {path}; '
            'delete it to measure again)')
        return store[key]
    result = json.loads(json.dumps(compute()))  # tuples -> lists, as read back
    store[key] = result
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(store, f)
    os.replace(tmp, path)
    return result


def run_first(name):
    """The command that writes a stage's checkpoint ('sft.pt' -> 'python sft.py'), for error messages."""
    stage = os.path.basename(name).removesuffix('.pt')
    return f'python {stage}.py' if stage in ('gpt', 'sft', 'reward', 'ppo') else f'what wrote {name}'


def checkpoint_path(name, out_dir):
    """'ppo' | 'sft' | 'gpt' | a path -> the checkpoint path. A missing ppo.pt falls back to the policy
    before it, sft.pt, then gpt.pt, with a note."""
    if name not in ('ppo', 'sft', 'gpt'):
        return name
    path = os.path.join(out_dir, f'{name}.pt')
    for fallback in {'ppo': ['sft', 'gpt'], 'sft': ['gpt']}.get(name, []):
        if os.path.exists(path):
            break
        path = os.path.join(out_dir, f'{fallback}.pt')
        print(f'note: no {out_dir}/{name}.pt yet (run python {name}.py); trying {path}', file=sys.stderr)
    return path


def load_checkpoint(path, run_first='python gpt.py'):
    """Load a checkpoint dict with weights_only=True (a pickle could run code; ours never needs to)."""
    if not os.path.exists(path):
        raise MinibardError(f'no {path}: run {run_first} first')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated, corrupt, or a pickle that wants to run code
        raise MinibardError(f'cannot load {path} ({type(e).__name__}): it is not a checkpoint minibard '
                            f'wrote, or was cut short; {run_first} writes it anew') from None


def checkpoint_kind(checkpoint):
    """What a checkpoint dict holds, from the keys each step writes: 'reward model', 'preference
    data' or 'GPT' (gpt.py, sft.py, ppo.py and dpo.py all write a GPT)."""
    if 'model' not in checkpoint:
        return 'preference data' if 'train' in checkpoint else 'something else'
    return 'reward model' if 'rm_context' in checkpoint else 'GPT'


def load_model(path, build, run_first, device='cpu', kind='GPT'):
    """(model, vocab, checkpoint dict): build(checkpoint) makes the module, the saved weights go in;
    on `device`, in eval mode. A checkpoint of another kind than `kind` is named as such."""
    checkpoint = load_checkpoint(path, run_first)
    found = checkpoint_kind(checkpoint)
    if found != kind:
        writers = {'GPT': 'gpt.py, sft.py, ppo.py or dpo.py', 'reward model': 'reward.py'}[kind]
        named = lambda k: k if k in ('preference data', 'something else') else f'a {k}'
        raise MinibardError(f'{path} holds {named(found)}, not {named(kind)}: give a checkpoint of {writers}')
    model = build(checkpoint)
    load_weights(model, checkpoint['model'], path, run_first)
    return model.to(device).eval(), checkpoint['vocab'], checkpoint


def load_weights(module, state, path, run_first):
    """load_state_dict, with a mismatch (a checkpoint edited or from another shape) as one clear line."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise MinibardError(f'{path} does not fit the model its own settings describe '
                            f'({" ".join(str(e).split())[:160]}): it was edited, or written by another '
                            f'version of minibard; {run_first} writes it anew') from None


def prepare_out_dir(out_dir):
    """Make sure out_dir exists and is writable before any work is done."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f'.write_test{os.getpid()}'), 'w'):
            pass
        os.remove(os.path.join(out_dir, f'.write_test{os.getpid()}'))
    except OSError as e:
        raise MinibardError(f'cannot write to out_dir {out_dir!r} ({e.strerror}): choose another with '
                            '--out_dir=...')


# ------------------------------------------------------------------ the corpus and its characters
END_OF_TURN = '\n\n'  # a speech ends with a blank line before the next speaker, as in input.txt


def load_text(path):
    """The corpus as a string; a missing or empty file is a user error."""
    if not os.path.exists(path):
        raise MinibardError(f'no {path}: copy Tiny Shakespeare there (see README.md)')
    if os.path.isdir(path):
        raise MinibardError(f'{path} is a folder, not a text file')
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise MinibardError(f'{path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}): '
                            'use a plain text file')
    if len(text) < 1000:
        raise MinibardError(f'{path} has only {len(text)} characters: it should be Tiny Shakespeare '
                            '(1,115,394)')
    return text


def build_vocab(text):
    """The sorted set of characters of the corpus (65 for Tiny Shakespeare)."""
    return ''.join(sorted(set(text)))


def encode(s, vocab):
    """str -> list of ints. A character outside the vocabulary is a user error, named."""
    stoi = {ch: i for i, ch in enumerate(vocab)}
    bad = sorted(set(ch for ch in s if ch not in stoi))
    if bad:
        raise MinibardError(f'characters not in the vocabulary: {"".join(bad)!r}; use only {vocab!r}')
    return [stoi[ch] for ch in s]


def decode(ids, vocab):
    """list (or 1-D tensor) of ints -> str."""
    return ''.join(vocab[i] for i in (ids.tolist() if torch.is_tensor(ids) else ids))


def load_splits(path, vocab=None):
    """(train, val, vocab): the corpus as token tensors, split by position (first 90% train).
    With a checkpoint's vocab, the corpus must use only its characters."""
    text = load_text(path)
    vocab = vocab or build_vocab(text)
    extra = set(text) - set(vocab)
    if extra:
        raise MinibardError(f'{path} has characters the checkpoint never saw ({"".join(sorted(extra))!r}): '
                            'train on this corpus from scratch with python gpt.py')
    data = torch.tensor(encode(text, vocab), dtype=torch.long)
    n = int(0.9 * len(data))
    return data[:n], data[n:], vocab


def get_batch(data, block_size, batch_size, generator, device='cpu'):
    """batch_size random windows of a split (1-D tokens): inputs x and next characters y, (B, T) each."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([data[i:i + block_size] for i in ix])  # (B, T)
    y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix])  # (B, T), shifted by one
    return x.to(device), y.to(device)


def cpu_has_bf16():
    """True where this CPU has bf16 matmul units (AVX512-BF16): there bf16 matmuls are ~4x fp32's."""
    return getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)()  # private; absent: False


def lr_at(it, lr, warmup, total, min_ratio, decay):
    """The learning rate at iteration it: linear warmup over `warmup` iterations, then 'cosine'
    or 'linear' decay from lr to lr * min_ratio at iteration `total` (held there after it)."""
    if it < warmup:
        return lr * (it + 1) / warmup
    ratio = min(1.0, (it - warmup) / max(1, total - warmup))
    left = 0.5 * (1 + math.cos(math.pi * ratio)) if decay == 'cosine' else 1 - ratio  # 1 -> 0
    return lr * min_ratio + left * (lr - lr * min_ratio)


# ------------------------------------------------------------------ turns: prompts and answers
def turn_starts(data, vocab, prompt_len):
    """Where the speeches of a 1-D token tensor begin, after a blank line and the speaker's name
    ('\\n\\nROMEO:\\n'), with prompt_len tokens before: a LongTensor of positions."""
    text = decode(data, vocab)
    return torch.tensor([m.end() for m in re.finditer(r'\n\n[^\n]+:\n', text) if m.end() >= prompt_len])


def sample_prompts(data, starts, n, length, generator):
    """n prompts: the `length` tokens before a random speech start of `starts` -> (n, length)."""
    ix = starts[torch.randint(len(starts), (n,), generator=generator)]
    return torch.stack([data[i - length:i] for i in ix])


@torch.no_grad()
def sample_answers(model, prompts, max_len, stop, temperature, generator, batch=1024, top_k=None,
                   on_progress=None):
    """One turn after each prompt (N, Tp), ended by the tokens `stop`: answers (N, Ta) padded
    after their end and lengths (N,); Ta is the longest answer, at most max_len. on_progress(n),
    if given, is called after each generate() call of n rows (a progress() counter)."""
    outs = []
    for i in range(0, len(prompts), batch):
        outs.append(model.generate(prompts[i:i + batch], max_len, temperature=temperature, top_k=top_k,
                                   generator=generator, stop=stop))
        if on_progress:
            on_progress(len(outs[-1][0]))
    Ta = max(o[1].size(1) for o in outs)
    pad = stop[-1] if stop else 0
    answers = [F.pad(out[:, prompts.size(1):], (0, Ta - (out.size(1) - prompts.size(1))), value=pad)
               for out, _, _ in outs]
    return torch.cat(answers), torch.cat([lengths for *_, lengths in outs])


def by_length(fn, seqs, lengths, prompt_len, chunk):
    """fn over prompt + answer sequences (N, Tp + Ta) with answer lengths (N,), in chunks of `chunk`
    rows sorted by length, each chunk cut to its longest answer: the padding after the answers is
    hardly ever computed, and a small chunk stays in the CPU's cache. fn(seqs (b, Tp + t), lengths
    (b,)) returns a tensor (b,) or (b, t), or a tuple of them; -> the same for all N rows, in the
    order given, (N, t) ones padded with zeros to (N, Ta)."""
    Ta = seqs.size(1) - prompt_len
    order = lengths.argsort(stable=True)
    parts = []
    for i in order.split(chunk):
        out = fn(seqs[i, :prompt_len + int(lengths[i].max())], lengths[i])
        parts.append(out if isinstance(out, tuple) else (out,))
    back = order.argsort()  # row k of the sorted batch -> k
    outs = tuple(torch.cat([F.pad(p, (0, Ta - p.size(1))) if p.dim() == 2 else p for p in ps])[back]
                 for ps in zip(*parts))
    return outs if isinstance(out, tuple) else outs[0]


def answer_mask(lengths, width):
    """(B, width) float mask: 1 on the first lengths[b] positions of each row (the answer), 0 after."""
    return (torch.arange(width, device=lengths.device) < lengths[:, None]).float()


def ended(answers, lengths, stop):
    """True where an answer (N, Ta) ends, within its length (N,), with the tokens `stop`: the
    speaker stopped, rather than running into max_answer_len."""
    at = (lengths[:, None] - len(stop) + torch.arange(len(stop), device=lengths.device)).clamp(min=0)
    stop = torch.tensor(stop, device=answers.device)
    return (lengths >= len(stop)) & (answers.gather(1, at) == stop).all(1)


def answer_texts(answers, lengths, vocab):
    """Each answer (N, Ta) up to its length, as a string."""
    return [decode(a[:n], vocab) for a, n in zip(answers.tolist(), lengths.tolist())]


# ------------------------------------------------------------------ turns in the chat
TAG = re.compile(r"\n[A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*){0,3}:\n")  # a speaker's name on a line of its own


def clean(text, vocab):
    """Drop characters the model never saw; returns (kept text, dropped characters)."""
    dropped = ''.join(sorted(set(ch for ch in text if ch not in vocab)))
    return ''.join(ch for ch in text if ch in vocab), dropped


def format_chat(turns, bard, max_chars):
    """The play format of input.txt: 'NAME:\\nline\\n\\n' per turn, then 'BARD:\\n' to answer.

    Oldest turns are dropped until the prompt fits in max_chars; if the newest turn alone does
    not fit, its tail is kept (the model has only block_size characters of context)."""
    tail = f'{bard}:\n'
    for first in range(len(turns)):
        prompt = ''.join(f'{who}:\n{line}\n\n' for who, line in turns[first:]) + tail
        if len(prompt) <= max_chars:
            return prompt
    return prompt[-max_chars:]


def end_of_turn(answer):
    """The answer up to the end of its turn: the blank line before the next speaker, or a line that
    names another speaker (input.txt always puts a blank line first; the model may not).
    Returns (text, ended: whether the turn ended there rather than running out)."""
    text, ended_here = answer.split(END_OF_TURN)[0], END_OF_TURN in answer
    tag = TAG.search('\n' + text + '\n')  # also a name on the answer's first line
    if tag:
        text, ended_here = text[:max(0, tag.start() - 1)], True
    return text.strip('\n'), ended_here


def whole(text, ended):
    """What the chat shows of a turn: one that ended on its own whole; one that ran into the length
    limit trimmed back to its last whole line or sentence (. ! ? ; :), or with neither to its last
    whole word, so that no answer is shown cut mid-word. -> (shown, how: '', 'line', 'sentence',
    'word' or 'none')."""
    if ended:
        return text, ''
    ends = [(p, 'line') for p in range(1, len(text)) if text[p] == '\n']
    ends += [(p + 1, 'sentence') for p in range(len(text)) if text[p] in '.!?;:'
             and (p + 1 == len(text) or text[p + 1] in ' \n')]
    if ends:
        p, how = max(ends)
        return text[:p].rstrip(), how
    if ' ' in text.strip():
        return text.strip()[:text.strip().rindex(' ')], 'word'
    return text, 'none'


def as_turns(texts, vocab, device='cpu'):
    """Answers as the scene holds them, each text then the blank line that ends a turn, encoded and
    padded after its end: -> (answers (N, Ta), lengths (N,)), what the RM scores in both chat modes."""
    ids = [encode(text + END_OF_TURN, vocab) for text in texts]
    lengths = torch.tensor([len(t) for t in ids], device=device)
    answers = torch.full((len(ids), int(lengths.max())), ids[0][-1], device=device)  # pad: the end token
    for i, t in enumerate(ids):
        answers[i, :len(t)] = torch.tensor(t, device=device)
    return answers, lengths
