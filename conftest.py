"""pytest's shared setup for test_all.py: the paths, a tiny model, the stage runners, and the run
graph of tiny stages that start in the background with the first test (fixture `runs`), each as
soon as the checkpoints it needs exist, so they go side by side with the in-process tests."""
import json
import multiprocessing
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

# torch.cuda.is_available() by NVML, which leaves CUDA uninitialised: the server below imports the
# scripts (each asks it for its device default) and forks, and a forked CUDA state is unusable
os.environ.setdefault('PYTORCH_NVML_BASED_CUDA_CHECK', '1')
import torch  # noqa: E402 (after the line above)

from model import GPT, GPTConfig
from plumbing import MinibardError, save_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = ''.join(sorted(set(open(os.path.join(HERE, 'input.txt')).read())))
TINY = GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)
# this process and every stage run take one thread each: many at once share the 2 cores, not fight;
# output unbuffered, so that a test reading a run line by line (Ctrl-C once training has begun)
# sees each line when it is printed
torch.set_num_threads(1)
CHILD_ENV = {'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
# Every stage run of the suite says --device=cpu, so the suite runs alike on a GPU machine. In the
# stage's process CUDA then looks present but with no GPU: a stage that chose its device by itself
# would pick 'cuda' and end in an error, on any machine (test_stages_choose_the_cpu_themselves).
NO_GPU = 'import torch; torch.cuda.is_available = lambda: True; torch.cuda.device_count = lambda: 0'
AS_MAIN = 'import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")'


class StubRM(torch.nn.Module):
    """A 'reward model' that reads the last prompt character and the answer up to its length, and
    rewards the prompt character plus a hundredth of the answer's last one plus a thousandth
    of its length (checks of plumbing)."""
    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(()))  # score() puts inputs on the RM's device

    def forward(self, seqs, prompt_len, lengths=None):
        lengths = torch.full((len(seqs),), seqs.size(1) - prompt_len) if lengths is None else lengths
        last = seqs[torch.arange(len(seqs)), prompt_len + lengths - 1]
        return seqs[:, prompt_len - 1].float() + 0.01 * last.float() + 1e-3 * lengths.float()


STARTED = []  # every stage process, so that the end of the session can stop what is left


def tiny_model(seed=0, config=TINY):
    torch.manual_seed(seed)
    model = GPT(config).eval()
    # a token mix that mixes, as after training (it starts as identity)
    torch.nn.init.normal_(model.tok_mix, std=0.5)
    return model


def save_tiny(model, path):
    """Save a TINY model as a checkpoint with the keys every stage reads."""
    save_checkpoint({'model': model.state_dict(), 'model_args': vars(TINY), 'vocab': VOCAB}, str(path))


def start(script, *args, stdin=None):
    """Start a stage as a user would, in the background (runs go side by side to keep the suite fast)."""
    env = dict(os.environ, **CHILD_ENV)
    p = subprocess.Popen([sys.executable, '-c', f'{NO_GPU}; {AS_MAIN}', os.path.join(HERE, script), *args],
                         cwd=HERE, env=env,
                         stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    STARTED.append(p)
    return p, stdin


def finish(job):
    """(exit code, stdout + stderr) of a started stage."""
    p, stdin = job
    out = p.communicate(stdin.encode('utf-8') if isinstance(stdin, str) and not p.text_mode else stdin,
                        timeout=300)[0]
    return p.returncode, out.decode('utf-8', 'replace') if isinstance(out, bytes) else out


# A fresh `python` imports torch and, where an optimizer is built, torch._dynamo (torch.optim
# imports it on first use): more CPU than a tiny stage's own work (docs/speed.md). So the suite's
# stage runs are forked from one server process that has imported all that once.
# Linux only (macOS frameworks are not safe to fork), and only where the runs go to the CPU: a GPU
# machine runs each stage in a fresh python, as before.
FORKSERVER = (multiprocessing.get_context('forkserver')
              if sys.platform.startswith('linux') and not torch.cuda.is_available() else None)
if FORKSERVER is not None:
    FORKSERVER.set_forkserver_preload(['torch._dynamo', 'conftest', 'plumbing', 'configurator', 'data',
                                       'model', 'labeler', 'frontier', 'gpt', 'sft', 'reward', 'ppo', 'dpo',
                                       'expert_iteration', 'sample'])


def _stage_main(script, args, stdin_path, out_path):
    """In the forked child: what `python script args` does (cwd, argv, sys.path, one thread, uncaught
    exceptions through sys.excepthook, exit code), with stdout and stderr into out_path."""
    os.environ.update(CHILD_ENV)
    torch.set_num_threads(1)
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)  # C-level output too, in order
    sys.stdout = sys.stderr = open(1, 'w', encoding='utf-8', buffering=1, closefd=False)
    sys.stdin = open(stdin_path or os.devnull, encoding='utf-8')
    os.chdir(HERE)
    path = os.path.join(HERE, script)
    sys.argv, sys.path[0] = [path, *args], HERE
    exec(NO_GPU)
    code = 0
    try:
        runpy.run_path(path, run_name='__main__')
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException as e:  # what Python does with it at exit
        sys.excepthook(type(e), e, e.__traceback__)
        code = 1
    sys.stdout.flush()
    os._exit(code)


def run_python(script, *args, stdin=None):
    """Run a stage in a fresh `python script args` process; returns (exit code, stdout + stderr)."""
    return finish(start(script, *args, stdin=stdin))


def run(script, *args, stdin=None):
    """Run a stage as `python script args` would, forked from the server; (exit code, stdout + stderr)."""
    if FORKSERVER is None:
        return run_python(script, *args, stdin=stdin)
    with tempfile.TemporaryDirectory() as tmp:
        out_path, stdin_path = os.path.join(tmp, 'out'), None
        if stdin is not None:  # text, or bytes as they come (not all of them UTF-8)
            stdin_path = os.path.join(tmp, 'in')
            with open(stdin_path, 'wb') as f:
                f.write(stdin if isinstance(stdin, bytes) else stdin.encode('utf-8'))
        p = FORKSERVER.Process(target=_stage_main, args=(script, args, stdin_path, out_path))
        p.start()
        STARTED.append(p)
        p.join(300)
        if p.exitcode is None:
            p.kill()
            p.join()
        if not os.path.exists(out_path):  # it ended before it could start
            return p.exitcode, f'{script} did not start in the forked process (its error: pytest\'s stderr)'
        with open(out_path, encoding='utf-8', errors='replace') as f:
            return p.exitcode, f.read()


# ------------------------------------------------------------------ the tiny pipeline, end to end
CHAT_LINES = [  # what a user might say to the bard (README: the real model's answers to them)
    'What light through yonder window breaks?', 'Good morrow, fair lady.', 'Wilt thou be gone?',
    'I love thee, sweet lady.', 'Who art thou?', 'Tell me, what news from Verona?', 'Ay.',
    'Speak!', 'The king is dead; long live the king.', 'What news, 7 émissaries?',
    'O, that I were a glove upon that hand, that I might touch that cheek!',
    'ROMEO: I am not here.', 'Away, thou villain! Thou art a traitor and a coward.', 'Hast thou no friends?',
    "Thy tears are salt; wipe them, and be merry.", 'Farewell, farewell; one kiss, and I will descend.',
    'Is the day so young?', 'Come, come, you talk greedily.', 'Peace, peace!' * 12, 'Good night.', '']

TINY_GPT = ['--n_layer=2', '--n_head=2', '--n_embd=48', '--block_size=64', '--batch_size=8', '--dropout=0.1',
            '--max_iters=80', '--eval_interval=40', '--eval_iters=4', '--log_interval=1',
            '--learning_rate=3e-3', '--warmup_iters=10', '--sample_chars=50']
TINY_RM = ['--prompt_len=16', '--max_answer_len=32', '--K=4', '--train_prompts=64', '--dev_prompts=16',
           '--val_prompts=32', '--prompts_per_batch=8', '--evals=2', '--log_interval=1']
TINY_SFT = ['--max_answer_len=32', '--batch_size=8', '--max_iters=15', '--eval_interval=5',
            '--eval_prompts=8',
            '--eval_samples=1', '--log_interval=5']
TINY_DPO = ['--eval_prompts=8', '--eval_samples=1', '--prompts_per_batch=4', '--eval_interval=10',
            '--log_interval=5']
TINY_EI = ['--rounds=2', '--prompts_per_round=8', '--n=4', '--steps_per_round=3', '--batch_size=4',
           '--learning_rate=1e-3', '--eval_prompts=8', '--eval_samples=1', '--val_prompts=4',
           '--val_interval=2']
TINY_PPO = ['--max_iters=3', '--batch_size=16', '--eval_prompts=8', '--best_of_max=16', '--eval_samples=1',
            '--eval_interval=2']
SMALL_RM = [*TINY_RM, '--train_prompts=16', '--dev_prompts=8', '--val_prompts=8']  # the road without SFT
SMALL_PPO = [*TINY_PPO, '--max_iters=1', '--eval_interval=1']
DDP_GPT = [*TINY_GPT, '--dropout=0.0', '--n_embd=32', '--block_size=32', '--batch_size=4', '--max_iters=12',
           '--eval_interval=6',
           '--eval_iters=2', '--log_interval=3', '--sample_chars=10']


class Runs:
    """Stage runs as a user would start them, each begun in the background as soon as the
    checkpoints it needs exist, so they go side by side with each other and with the in-process
    tests. runs[name] waits for one and gives (exit code, stdout + stderr); runs.dirs[name] is
    the out_dir it worked in."""
    def __init__(self, root):
        self.root, self.pool, self.jobs = root, ThreadPoolExecutor(max_workers=16), {}
        self.dirs = {'out': str(root / 'out')}  # the main chain gpt -> reward -> ppo

    def add(self, name, script, *args, after=None, own=None, stdin=None, job=run, beside=False):
        """Run `script` once the run `after` (added before this one) has succeeded: in out/, or,
        given `own` (a list of checkpoint names), in a fresh folder holding copies of those, or,
        `beside` True, in the folder of the run `after`."""
        def work():
            if after is not None and self[after][0] != 0:
                return 1, f'not run: {after} failed\n{self[after][1]}'
            if own is not None:
                self.dirs[name] = copy_ckpts(self.dirs['out'], self.root / name, *own)
            if beside:
                self.dirs[name] = self.dirs[after]
            cpu = ['--device=cpu'] if script != 'frontier.py' else []  # the suite's runs: on the CPU
            return job(script, f'--out_dir={self.dirs.get(name, self.dirs["out"])}', *cpu, *args, stdin=stdin)
        self.jobs[name] = self.pool.submit(work)

    def __getitem__(self, name):
        return self.jobs[name].result()


def copy_ckpts(src, dst, *names):
    os.makedirs(dst, exist_ok=True)
    for n in names:
        shutil.copy(os.path.join(src, n), dst)
    return str(dst)


def with_sft_as_gpt(script, out_dir_arg, *args, stdin=None):
    """Run a stage in a folder whose sft.pt is a copy of the main chain's gpt.pt (SFT that moved nothing)."""
    out = out_dir_arg.split('=', 1)[1]
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(os.path.dirname(out), 'out', 'gpt.pt'), os.path.join(out, 'sft.pt'))
    return run(script, out_dir_arg, *args, stdin=stdin)


def torchrun(script, *args, stdin=None):
    """Run a stage as N = 2 CPU processes under torchrun (gloo), as a user with two GPUs would run it."""
    env = dict(os.environ, **CHILD_ENV)
    path = script if os.path.isabs(script) else os.path.join(HERE, script)
    p = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          path, *args], cwd=HERE, text=True, env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    STARTED.append(p)
    return finish((p, None))


DRAW_MASK = r"""import hashlib, sys, torch
sys.path.insert(0, sys.argv[1])
from gpt import start_processes
rank, world, device = start_processes(1337, 'cpu')  # as gpt.py starts
mask = torch.nn.Dropout(0.2).train()(torch.ones(4096)) != 0  # what a dropout layer draws next
sys.stdout.write(f'rank {rank} of {world}: mask {hashlib.sha256(bytes(mask.tolist())).hexdigest()[:12]}\n')
"""


def ranks_masks(script, out_dir_arg, *args, stdin=None):
    """Two gloo processes started as gpt.py starts them (gpt.start_processes), each drawing a dropout mask."""
    path = os.path.join(out_dir_arg.split('=', 1)[1], 'draw_mask.py')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(DRAW_MASK)
    return torchrun(path, HERE)


def with_damaged_results(script, out_dir_arg, *args, stdin=None):
    """Run a stage beside kept results that are damaged: a best_of_n.json of another shape, a run's json
    cut short, one that is not UTF-8 and one that parses but is no run (as a careless copy leaves them)."""
    out = out_dir_arg.split('=', 1)[1]
    with open(os.path.join(out, 'best_of_n.json')) as f:  # the same keys, each kept curve of another shape
        kept = {key: [[{'method': 'best_of_n', 'gold': 'high'}], {}] for key in json.load(f)}
    for name, data in [('best_of_n.json', json.dumps(kept).encode()), ('dpo_beta9.json', b'\xff\xfe{}'),
                       ('grpo.json', b'{"eval": {"best_of_n": [{"gold'), ('dpo_beta7.json', b'{"path": 3}')]:
        with open(os.path.join(out, name), 'wb') as f:
            f.write(data)
    return run(script, out_dir_arg, *args, stdin=stdin)


def interrupted(script, *args, stdin=None):
    """Start a long gpt.py run, press Ctrl-C once it is training: (exit code, what it printed after).
    The child gets Ctrl-C's default handler back first, as at a terminal: a suite started in the
    background (`cmd &`) passes SIGINT on ignored, and Python then never raises KeyboardInterrupt."""
    run_it = f'import signal; signal.signal(signal.SIGINT, signal.default_int_handler); {NO_GPU}; {AS_MAIN}'
    env = dict(os.environ, **CHILD_ENV)
    long_run = [*args, '--max_iters=100000', '--eval_interval=20']
    p = subprocess.Popen([sys.executable, '-c', run_it, os.path.join(HERE, script), *long_run], cwd=HERE,
                         text=True, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    STARTED.append(p)
    for line in p.stdout:  # wait until it has begun training
        if line.startswith('iter 5/'):
            break
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=60)[0]
    return p.returncode, out


@pytest.fixture(autouse=True)
def cpu_machine(monkeypatch):
    """In-process tests see a machine without CUDA: the scripts' defaults are the CPU ones anywhere."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)


@pytest.fixture(scope='session', autouse=True)
def start_runs_early(request):
    """Begin the end-to-end runs with the first test, when any selected test reads them."""
    if any('runs' in item.fixturenames for item in request.session.items):
        request.getfixturevalue('runs')


@pytest.fixture(scope='session')
def runs(tmp_path_factory):
    """Every end-to-end run of the suite, each started as soon as it can be."""
    r = Runs(tmp_path_factory.mktemp('runs'))
    r.add('gpt', 'gpt.py', *TINY_GPT)
    # same seed, same settings, alongside, in a fresh python: the forked runs are what a real one does
    r.add('gpt_again', 'gpt.py', *TINY_GPT, own=[], job=run_python)
    r.add('sft', 'sft.py', *TINY_SFT, after='gpt')
    r.add('reward', 'reward.py', *TINY_RM, after='sft')
    r.add('reward_again', 'reward.py', *TINY_RM, after='sft', own=['sft.pt'])
    r.add('reward_no_sft', 'reward.py', *SMALL_RM, '--policy=gpt.pt', after='gpt', own=['gpt.pt'])
    r.add('ppo_no_sft', 'ppo.py', *SMALL_PPO, '--policy=gpt.pt', after='reward_no_sft', beside=True)
    r.add('reward_sft_copy', 'reward.py', *SMALL_RM, after='gpt', own=[], job=with_sft_as_gpt)
    shape_given_once = [a for a in TINY_GPT if not a.startswith('--block_size')]  # resume: from gpt.pt
    r.add('resume', 'gpt.py', *shape_given_once, '--init_from=resume', '--max_iters=120', after='gpt',
          own=['gpt.pt'])
    r.add('ctrl_c', 'gpt.py', *TINY_GPT, after='gpt', own=['gpt.pt'], job=interrupted)
    r.add('gpt_accum2', 'gpt.py', *DDP_GPT, '--gradient_accumulation_steps=2', own=[])
    r.add('gpt_patience', 'gpt.py', *TINY_GPT, '--max_iters=400', '--eval_interval=5', '--eval_iters=1',
          '--patience=1', own=[])  # a noisy val loss stops it early
    r.add('gpt_ddp', 'gpt.py', *DDP_GPT, own=[], job=torchrun)  # 2 processes, 1 micro-batch each
    r.add('ddp_masks', 'gpt.py', own=[], job=ranks_masks)  # 2 gloo processes, each a dropout mask
    r.add('sft_torchrun', 'sft.py', *TINY_SFT, after='gpt', own=['gpt.pt'], job=torchrun)  # one process only
    r.add('sft_diverged', 'sft.py', *TINY_SFT, '--learning_rate=1e6', after='gpt', own=['gpt.pt'])
    r.add('ppo', 'ppo.py', *TINY_PPO, after='reward')
    r.add('ppo_again', 'ppo.py', *TINY_PPO, after='reward', own=['sft.pt', 'reward.pt', 'preferences.pt'])
    r.add('ppo_nan', 'ppo.py', *TINY_PPO, '--learning_rate=1e30', after='ppo', own=['sft.pt', 'reward.pt',
                                                                                    'ppo.pt', 'ppo_log.csv'])
    r.add('eval', 'sample.py', '--mode=eval', after='ppo')
    r.add('roads_rloo', 'ppo.py', *SMALL_PPO, '--advantage=rloo', after='ppo_again', beside=True,
          job=with_damaged_results)
    r.add('roads_dpo', 'dpo.py', *TINY_DPO, after='ppo_again', beside=True)  # beside RLOO, at once
    r.add('roads_ei', 'expert_iteration.py', *TINY_EI, after='ppo_again', beside=True)
    r.add('sample', 'sample.py', "--start=ROMEO:\\nO gentle", '--num_samples=4', after='ppo')
    r.add('chat', 'sample.py', '--mode=chat', after='ppo',  # and a line that is not UTF-8 (Latin-1 'Café')
          stdin='\n'.join(CHAT_LINES[:-1]).encode() + b'\nCaf\xe9 au lait\n\n')
    r.add('sample_long', 'sample.py', '--max_new_tokens=150', '--num_samples=2', after='ppo')
    yield r
    # a stopped or failed session: stop the rest
    r.pool.shutdown(wait=False, cancel_futures=True)
    for p in STARTED:
        if (p.poll() if isinstance(p, subprocess.Popen) else p.exitcode) is None:
            p.kill()


@pytest.fixture
def run_here(monkeypatch, capsys):
    """Run a stage's __main__ in this process, as `python script args` would: (exit code, what it
    printed). For the mistakes that end before any work, so the suite does not pay a process
    start and a torch import for each. die()'s SystemExit gives its code; a MinibardError goes
    through the hook configure() installed, as in a real process (one `error:` line, code 1);
    any other exception propagates and fails the test with its traceback, as a user would see one."""
    def go(script, *args):
        monkeypatch.chdir(HERE)
        monkeypatch.setattr(sys, 'argv', [script, *args])
        # configure() installs a Ctrl-C hook: undo it after
        monkeypatch.setattr(sys, 'excepthook', sys.excepthook)
        code = 0
        with torch.random.fork_rng():  # the scripts seed torch: keep ours
            try:
                runpy.run_path(os.path.join(HERE, script), run_name='__main__')
            except SystemExit as e:
                code = e.code
            except MinibardError as e:
                sys.excepthook(type(e), e, e.__traceback__)
                code = 1
        out = capsys.readouterr()
        return code, out.out + out.err
    return go
