"""
plumbing.py: what no step is about: one-line errors, progress, checkpoints written whole and checked
when read, results kept while their inputs are unchanged.
"""
import errno
import hashlib
import json
import os
import re
import sys
import time

import torch

try:
    import fcntl  # a lock that ends with its process, however it ends (not on Windows)
except ImportError:
    fcntl = None
MASTER = os.environ.get('RANK', '0') == '0'  # under torchrun, rank 0 alone says what went wrong


# ------------------------------------------------------------------ errors
class MinibardError(ValueError):
    """A mistake a user can fix: its message is one line that says what to do."""


def die(msg):
    """The `error:` line and exit 1, for a script's own checks (library code raises MinibardError)."""
    say_error(msg)
    sys.exit(1)


def say_error(msg):
    """`error: msg`, once under torchrun: another rank waits 3 s first, by when torchrun has stopped
    it if rank 0 failed too."""
    if not MASTER:
        time.sleep(3)
    print(f'error: {msg}', file=sys.stderr)


def exit_in_one_line(kind, value, tb, default=sys.excepthook):
    """sys.excepthook of every script: a MinibardError, Ctrl-C, no memory or disk: one line."""
    if issubclass(kind, BrokenPipeError):  # `python gpt.py --help | head`
        os._exit(141)
    if issubclass(kind, MinibardError):
        return say_error(value)
    oom = any(w in str(value) for w in ('out of memory', "can't allocate memory"))  # torch's words
    if issubclass(kind, KeyboardInterrupt):
        line, code = 'interrupted: stopped', 130
    elif issubclass(kind, OSError) and value.errno in (errno.ENOSPC, errno.EDQUOT):
        line, code = f'error: the disk is full ({value.filename or "writing"}): free some space', None
    elif issubclass(kind, MemoryError) or oom:
        line, code = 'error: out of memory: lower the sizes (batch_size, best_of, num_samples, ...)', 1
    else:
        return default(kind, value, tb)
    # save_checkpoint only ever replaces a file whole
    print(f'{line}; checkpoints saved before now are intact', file=sys.stderr, flush=True)
    if code:
        os._exit(code)


# ------------------------------------------------------------------ progress
def share_done(done, total):
    """'1200/6000 (20%)': where a run is."""
    return f'{done}/{total} ({100 * done // max(total, 1)}%)'


def eta(done, total, t0, start=0):
    """'eta 2m51s' at the pace of the done - start units since t0."""
    m, s = divmod(round((time.time() - t0) / max(done - start, 1) * (total - done)), 60)
    return f'eta {m}m{s:02d}s'


def progress(name, total, every, log=print):
    """advance(n): n more done; logs '<name> 4096/23200 (17%), eta 0m41s' every `every` and at the end."""
    t0, seen = time.time(), [0]

    def advance(n):
        seen[0] += n
        if seen[0] % every < n or seen[0] == total:
            log(f'{name} {share_done(seen[0], total)}, {eta(seen[0], total, t0)}')
    return advance


# ------------------------------------------------------------------ checkpoints
def replace_whole(path, write):
    """write(tmp), then os.replace: a crash or a full disk mid-write leaves `path` as it was."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(obj, path):
    """torch.save, all or nothing."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    try:
        replace_whole(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as e:  # torch says a full disk as a RuntimeError
        raise MinibardError(f'cannot write {path} ({" ".join(str(e).split())[:120]}): is the disk full? '
                            f'{path} is as it was') from None


def made_from(*paths):
    """{file name: digest} of a stage's inputs, kept in its checkpoint for load_checkpoint."""
    return {os.path.basename(p): digest(p) for p in paths}


def writer_of(name):
    """'out/sft.pt' -> 'python sft.py', for error messages."""
    stage = os.path.basename(name).removesuffix('.pt')
    steps = ('gpt', 'sft', 'reward', 'ppo', 'dpo', 'expert_iteration')
    return f'python {stage}.py' if stage in steps else f'what wrote {name}'


# The keys each kind of checkpoint has (and the steps that write it); `kind` is told by the keys.
KINDS = {'GPT': (('model', 'model_args', 'vocab'), 'gpt.py, sft.py, ppo.py, dpo.py or expert_iteration.py'),
         'reward model': (('model', 'model_args', 'vocab', 'rm_context', 'norm_bias', 'prompt_len',
                           'max_answer_len'), 'reward.py'),
         'preference data': (('train', 'dev', 'val', 'vocab', 'policy', 'prompt_len', 'max_answer_len',
                              'tau'), 'reward.py (preferences.pt)')}


def load_checkpoint(path, writer='python gpt.py', kind=None, stale_ok=False):
    """A checkpoint, read with weights_only=True (a pickle can run code); with `kind` (of KINDS), one of
    that kind with all its keys, made from the files beside it as they are now (unless stale_ok)."""
    if not os.path.exists(path):
        raise MinibardError(f'no {path}: run {writer} first')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated, corrupt, or a pickle that wants to run code
        raise MinibardError(f'cannot load {path} ({type(e).__name__}): it is not a checkpoint minibard '
                            f'wrote, or was cut short; {writer} writes it anew') from None
    if kind is None:
        return checkpoint
    found = 'something else'
    if isinstance(checkpoint, dict):
        found = 'reward model' if 'rm_context' in checkpoint else 'GPT' if 'model' in checkpoint else \
            'preference data' if 'train' in checkpoint else found
    if found != kind:
        a = lambda k: k if k in ('preference data', 'something else') else f'a {k}'
        raise MinibardError(f'{path} holds {a(found)}, not {a(kind)}: give a checkpoint of {KINDS[kind][1]}')
    missing = [k for k in KINDS[kind][0] if k not in checkpoint]
    if missing:
        raise MinibardError(f'{path} lacks {", ".join(missing)}: it was edited, or written by another '
                            f'version of minibard; {writer} writes it anew')
    for name, was in checkpoint.get('made_from', {}).items():
        parent = os.path.join(os.path.dirname(path), name)
        if not stale_ok and os.path.exists(parent) and digest(parent) != was:
            raise MinibardError(f'{path} was made from another {parent} than the one there now: {writer} '
                                'makes it anew, or add --allow_stale=True to go on')
    return checkpoint


def refuse_to_replace(path, budget, what):
    """A quick try never replaces a checkpoint trained on more `what` than this run's `budget`."""
    try:
        old = torch.load(path, map_location='cpu', weights_only=True).get('budget', 0)
    except Exception:  # missing or unreadable: nothing trained to keep
        return
    if old > budget:
        raise MinibardError(f'{path} was trained on {old:,} {what}, this run will train on {budget:,}: '
                            f'give a try its own --out_dir, or delete {path} to replace it')


def load_weights(module, state, path, writer):
    """load_state_dict, a mismatch said in one line."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise MinibardError(f'{path} does not fit the model its own settings describe '
                            f'({" ".join(str(e).split())[:160]}): it was edited, or written by another '
                            f'version of minibard; {writer} writes it anew') from None


LOCKS = {}  # lock file -> its open descriptor: held by this process until it ends


def prepare_out_dir(out_dir, stage=None):
    """Before any work: out_dir writable, killed saves' temp files gone, and out_dir/.<stage>.lock held:
    a second run of the stage there is refused (it would write its files between ours)."""
    path = os.path.join(out_dir, f'.{stage}.lock' if stage else f'.write_test{os.getpid()}')
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = LOCKS.get(path) or os.open(path, os.O_RDWR | os.O_CREAT)
    except OSError as e:
        raise MinibardError(f'cannot write to out_dir {out_dir!r} ({e.strerror}): choose another with '
                            '--out_dir=...') from None
    if stage is None or fcntl is None:
        return os.close(lock) if stage else (os.close(lock), os.remove(path))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise MinibardError(f'another python {stage}.py is writing to {out_dir}: wait for it to end, or '
                            'give this run another --out_dir') from None
    LOCKS[path] = lock
    for name in os.listdir(out_dir):  # a save killed mid-write leaves <file>.tmp<its pid>
        pid = re.search(r'\.tmp(\d+)$', name)
        if pid and not alive(int(pid.group(1))):
            os.remove(os.path.join(out_dir, name))


def alive(pid):
    """Whether process `pid` runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's
        pass
    return True


# ------------------------------------------------------------------ kept results
def digest(x):
    """A short fingerprint of a file (a path) or a tensor's values."""
    if isinstance(x, torch.Tensor):
        data = str((x.dtype, tuple(x.shape))).encode() + x.detach().cpu().contiguous().numpy().tobytes()
    else:
        with open(x, 'rb') as f:
            data = f.read()
    return hashlib.sha256(data).hexdigest()[:16]


def write_json(obj, path):
    """json.dump, all or nothing."""
    def dump(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=2)
    replace_whole(path, dump)


def read_json(path, check=lambda x: True, what='a result minibard wrote'):
    """A kept json result, or None: missing, or (with a one-line note) damaged or failing check(value)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            value = json.load(f)
        if check(value):
            return value
        why = 'not the shape of ' + what
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError) as e:
        why = f'{type(e).__name__}: not {what}'
    print(f'note: {path} is damaged ({why}): skipped; the run that writes it writes it anew', file=sys.stderr)
    return None


def cached(path, key, compute, check=lambda x: True, log=print):
    """compute(), kept in the json file `path` under `key` (what it depends on: settings, file digests)
    and read back while it passes check()."""
    key = json.dumps(key, sort_keys=True)
    store = read_json(path, lambda s: isinstance(s, dict), 'kept results') or {}
    try:
        ok = key in store and check(store[key])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        ok = False
    if ok:
        log(f'(measured before with the same models, prompts and settings: read from {path}; '
            'delete it to measure again)')
        return store[key]
    if key in store:
        log(f'note: what {path} kept for these settings is of another shape: measured again')
    store[key] = json.loads(json.dumps(compute()))  # tuples -> lists, as read back
    write_json(store, path)
    return store[key]
