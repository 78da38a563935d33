"""
configurator.py: the options of every script (nanoGPT's name for the file that does this).

A script's options are the plain globals of its hyperparameter block, one `name = value  # rule:
what it is` a line, between '# hyperparameters' and the next '# ----' line. configure() applies
`--key=value` overrides to them: the value read as a Python literal, its type the default's, each
checked against the rule that opens its comment (`in [1, inf)`, `in (0, 1]`, `in {'a', 'b'}`,
`int in [1, inf) or None`; see RULE) before any work starts; an unknown key names the nearest one;
--help prints the block. A default can depend on the device (ByDevice). Mistakes raise the
project's MinibardError, which a script turns into one `error:` line.
"""
import ast
import difflib
import os
import re
import sys

import torch

from plumbing import MinibardError, exit_in_one_line


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


def configure(scope, argv, torchrun=False):
    """Apply `--key=value` overrides to a script's globals `scope`; return the options as a dict.

    The options are the names of the script's hyperparameter block (see option_block; a dict
    without a __file__: its plain values). The value is read as a Python literal (`--lr=3e-4`,
    `--top_k=None`, `--start='ROMEO:'`), falling back to the raw string. Its type must match the
    default's (an int is accepted for a float); a default of None accepts anything. An unknown key
    names the closest one. The --device override comes first: the defaults that depend on it
    (ByDevice) follow it. -h / --help prints the options (as on the device given) and exits. A
    script started by torchrun in several processes must say it runs so (torchrun=True).
    """
    sys.excepthook = exit_in_one_line
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 and not torchrun:
        name = os.path.basename(scope.get('__file__', 'this script'))
        raise MinibardError(f'{name} runs in one process: start it with python {name} '
                            '(torchrun is for gpt.py)')
    block = option_block(scope['__file__']) if '__file__' in scope else None
    if block is not None:
        keys = [n for names, _ in block for n in names]
    else:
        plain = (bool, int, float, str, type(None))
        keys = [k for k, v in scope.items() if not k.startswith('_') and isinstance(v, plain)]
    if 'device' in scope:
        given = [literal(a.split('=', 1)[1]) for a in argv if a.startswith('--device=')]
        scope['device'] = given[-1] if given else scope['device']
        if not isinstance(scope['device'], str):
            raise MinibardError(f"--device expects str, got {scope['device']!r}: use 'cpu' or 'cuda'")
        check_device(scope['device'])
        resolve_defaults(scope, scope['device'])
        if torch.device(scope['device']).type == 'cuda':  # TF32 matmuls where fp32 remains (nanoGPT)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if '-h' in argv or '--help' in argv:
        print_help(scope, block)
        sys.exit(0)
    for arg in argv:
        if not arg.startswith('--') or '=' not in arg:
            raise MinibardError(f'cannot read argument {arg!r}: overrides look like --key=value '
                                '(--help lists them)')
        key, text = arg[2:].split('=', 1)
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
    """MinibardError unless value keeps the rule at the start of the option's comment."""
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
    """MinibardError unless `device` names a device this machine has."""
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
