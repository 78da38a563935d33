"""
plumbing.py: what every minibard script needs and none of them is about: errors in one line
(MinibardError), progress and ETA, checkpoints saved atomically and read back checked, json
results read back checked and kept while what they depend on is unchanged. Imports only torch.
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
    """A mistake a user can fix (a bad option, a missing or wrong file): its message is one line that
    says what to do. Library code raises it; a script's excepthook prints it as that `error:` line."""


def die(msg):
    """For a script's own checks, under `if __name__ == '__main__':` only: one line saying what to
    do, non-zero exit, no traceback. (Imported code raises MinibardError instead.)"""
    say_error(msg)
    sys.exit(1)


def say_error(msg):
    """The `error:` line, once under torchrun, where every rank meets the same mistake: rank 0 says it
    at once; another rank says it only if it still lives 3 s later (rank 0 did not fail, so the
    mistake is that rank's own): torchrun stops every rank as soon as one has failed."""
    if not MASTER:
        time.sleep(3)
    print(f'error: {msg}', file=sys.stderr)


def exit_in_one_line(kind, value, tb, default=sys.excepthook):
    """sys.excepthook of every script: a MinibardError, Ctrl-C, running out of memory or disk
    anywhere: one line, no traceback, exit code 1 (130 for Ctrl-C). Checkpoints are only ever
    replaced whole (save_checkpoint), so whatever was saved before is intact."""
    intact = 'checkpoints saved before now are intact'
    if issubclass(kind, KeyboardInterrupt):
        print(f'interrupted: stopped; {intact}', file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)
    if issubclass(kind, BrokenPipeError):  # `python gpt.py --help | head`
        os._exit(141)
    if issubclass(kind, MinibardError):
        return say_error(value)
    if issubclass(kind, OSError) and value.errno in (errno.ENOSPC, errno.EDQUOT):
        return print(f'error: the disk is full ({value.filename or "writing"}): free some space; {intact}',
                     file=sys.stderr)
    oom = any(words in str(value) for words in ('out of memory', "can't allocate memory"))  # torch's words
    if issubclass(kind, MemoryError) or oom:
        print(f'error: out of memory: lower the sizes (batch_size, best_of, num_samples, ...); {intact}',
              file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    default(kind, value, tb)


# ------------------------------------------------------------------ progress
def share_done(done, total):
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
            log(f'{name} {share_done(seen[0], total)}, {eta(seen[0], total, t0)}')
    return advance


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(obj, path):
    """Atomic save: write a temp file beside `path`, then os.replace, so a crash, Ctrl-C or a full
    disk mid-write leaves the previous good checkpoint untouched (and no temp file behind)."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch says a full disk as a RuntimeError
        raise MinibardError(f'cannot write {path} ({" ".join(str(e).split())[:120]}): is the disk full? '
                            f'{path} is as it was') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def made_from(*paths):
    """{file name: digest} of the checkpoints a stage starts from, kept in the one it writes, so that
    a later stage can tell a chain that changed under it (load_checkpoint)."""
    return {os.path.basename(p): digest(p) for p in paths}


def writer_of(name):
    """The command that writes a checkpoint ('out/sft.pt' -> 'python sft.py'), for error messages."""
    stage = os.path.basename(name).removesuffix('.pt')
    return f'python {stage}.py' if stage in ('gpt', 'sft', 'reward', 'ppo', 'dpo') else f'what wrote {name}'


# The keys each kind of checkpoint has (and the steps that write it); `kind` is told by the keys.
KINDS = {'GPT': (('model', 'model_args', 'vocab'), 'gpt.py, sft.py, ppo.py or dpo.py'),
         'reward model': (('model', 'model_args', 'vocab', 'rm_context', 'norm_bias', 'prompt_len',
                           'max_answer_len'), 'reward.py'),
         'preference data': (('train', 'dev', 'val', 'vocab', 'policy', 'prompt_len', 'max_answer_len',
                              'tau'), 'reward.py (preferences.pt)')}


def load_checkpoint(path, writer='python gpt.py', kind=None, stale_ok=False):
    """A checkpoint dict, read with weights_only=True (a pickle could run code; ours never needs to);
    with `kind` (a key of KINDS), one of that kind with all its keys, made from the checkpoints
    beside it as they are now (its made_from, unless stale_ok), else MinibardError."""
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
            raise MinibardError(f'{path} was made from another {parent} than the one there now (written '
                                f'again since): {writer} makes it anew, or add --allow_stale=True to go on')
    return checkpoint


def refuse_to_replace(path, budget, what):
    """MinibardError where `path` holds a checkpoint trained on more than this run's `budget` (its
    'budget': tokens, demonstrations, pairs or episodes, `what`): a quick try never replaces it."""
    try:
        old = torch.load(path, map_location='cpu', weights_only=True).get('budget', 0)
    except Exception:  # missing or unreadable: nothing trained to keep
        return
    if old > budget:
        raise MinibardError(f'{path} was trained on {old:,} {what}, this run will train on {budget:,}: '
                            f'give a try its own --out_dir, or delete {path} to replace it')


def load_weights(module, state, path, writer):
    """load_state_dict, with a mismatch (a checkpoint edited or from another shape) as one clear line."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise MinibardError(f'{path} does not fit the model its own settings describe '
                            f'({" ".join(str(e).split())[:160]}): it was edited, or written by another '
                            f'version of minibard; {writer} writes it anew') from None


LOCKS = {}  # lock file -> its open descriptor: held by this process until it ends


def prepare_out_dir(out_dir, stage=None):
    """Before any work: out_dir exists and is writable, temp files of saves that were killed are
    gone, and this process holds out_dir/.<stage>.lock, so that a second run of the same stage on
    the same folder is refused instead of writing its files between this one's."""
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
    """Whether a process of this pid runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's
        pass
    return True


# ------------------------------------------------------------------ kept results
def digest(x):
    """A short fingerprint of a file (a path) or a tensor's values: what a kept result depends on."""
    h = hashlib.sha256()
    if isinstance(x, torch.Tensor):
        h.update(str((x.dtype, tuple(x.shape))).encode() + x.detach().cpu().contiguous().numpy().tobytes())
    else:
        with open(x, 'rb') as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def write_json(obj, path):
    """json.dump to a temp file beside `path`, then os.replace: a reader never sees half a file."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(path, check=lambda x: True, what='a result minibard wrote'):
    """A kept json result, or None with one note on stderr where it is missing, damaged (cut
    short, not UTF-8, not JSON) or of another shape (check(value) False or raising): a damaged
    result beside a run is reported and skipped, never a traceback."""
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
    """compute() -> a json-able result, kept in the json file `path` under `key` (a dict of what the
    result depends on, digests of files among them): a later call with the same key reads it back
    instead of computing it again. A damaged file, or a kept result that fails check(), is
    computed again."""
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
