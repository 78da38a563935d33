"""
sample.py: talk to the bard. Step 4 of minibard: ask, read, compare.

Every answer comes with its reward-model score r and P = sigmoid(r). The RM is normalised so
that base-model answers score 0 on average, so by Bradley-Terry P reads: "the probability the
labeler prefers this answer to a typical base-model answer" (0.5 = as good as the base).
P is measured calibrated for what the RM was trained on (32-character prompts, 64-character
answers: see ece in out/reward.json); other shapes are scored the same way, unmeasured.

Run:
    python sample.py                                  # 3 answers from out/ppo.pt (or gpt.pt) with P
    python sample.py --start='ROMEO:\nO gentle' --best_of=16   # keep the RM's favourite of 16
    python sample.py --start=FILE:prompt.txt --ckpt=gpt        # prompt from a file, base model
    python sample.py --mode=chat                      # you speak as ROMEO, the bard answers as JULIET
    echo 'What light through yonder window breaks?' | python sample.py --mode=chat
    python sample.py --mode=eval                      # ppo.py's gold-vs-KL frontier again -> out/eval.json
"""
import json
import os
import sys
import time

import torch

from gpt import configure, decode, die, encode, load_model, load_splits, prepare_out_dir
from ppo import best_of_n_frontier, held_out_prompts, policy_point, print_frontier, print_samples, summary
from reward import best_of_n, load_reward_model

# ----------------------------------------------------------------------------------------
# hyperparameters (`--key=value` overrides any of them)
_gpu = torch.cuda.is_available()
device = 'cuda' if _gpu else 'cpu'
out_dir = 'out'
data_path = 'input.txt'         # eval mode: held-out prompts come from its validation part
ckpt = 'ppo'                    # 'ppo', 'gpt', or a path to any checkpoint; ppo falls back to gpt
mode = 'sample'                 # 'sample', 'chat' or 'eval'
start = '\n'                    # the prompt, or 'FILE:path' to read it from a file
num_samples = 3                 # answers printed in sample mode
max_new_tokens = None           # characters per answer; None: the RM's response_len (calibrated there)
temperature = 1.0               # the PPO policy was trained at 1.0
top_k = None                    # sample only among the k likeliest characters (None: all)
best_of = 1                     # draw n answers, keep the RM's favourite (1 = plain sampling)
seed = 1337
you = 'ROMEO'                   # chat: the character you speak as
bard = 'JULIET'                 # chat: the character the model answers as
# ----------------------------------------------------------------------------------------


def resolve_ckpt(name, out_dir):
    """'ppo' | 'gpt' | a path -> the checkpoint path; a missing ppo.pt falls back to gpt.pt with a note."""
    if name not in ('ppo', 'gpt'):
        return name
    path = os.path.join(out_dir, f'{name}.pt')
    if name == 'ppo' and not os.path.exists(path):
        print(f'note: no {path} yet (run python ppo.py); talking to the pretrained {out_dir}/gpt.pt', file=sys.stderr)
        return os.path.join(out_dir, 'gpt.pt')
    return path


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
    """The answer up to the end of its turn (the blank line before the next speaker)."""
    return answer.split('\n\n')[0].strip('\n')


def answer(model, rm, vocab, prompt, n_answers, gen):
    """n_answers answers to one prompt string, each the RM's favourite of best_of: [(text, r, P)]."""
    ids = torch.tensor([encode(prompt, vocab)], device=device).repeat(n_answers, 1)  # (n, T)
    y, r, _, _ = best_of_n(model, rm, ids, best_of, max_new_tokens, temperature, gen, top_k=top_k)
    return [(decode(y[i], vocab), r[i].item(), torch.sigmoid(r[i]).item()) for i in range(n_answers)]


if __name__ == '__main__':
    config = configure(globals(), sys.argv[1:])
    torch.manual_seed(seed)
    gen = torch.Generator(device).manual_seed(seed)
    if mode not in ('sample', 'chat', 'eval'):
        die(f"--mode must be 'sample', 'chat' or 'eval', got {mode!r}")
    path = resolve_ckpt('ppo' if mode == 'eval' else ckpt, out_dir)
    model, vocab, model_ckpt = load_model(path, run_first='python gpt.py' if path.endswith('gpt.pt') else 'python ppo.py',
                                          device=device)
    rm, rm_vocab, rm_ckpt = load_reward_model(os.path.join(out_dir, 'reward.pt'), device=device)
    if rm_vocab != vocab:
        die(f'{path} and {out_dir}/reward.pt use different vocabularies: retrain them from the same gpt.pt')
    max_new_tokens = max_new_tokens or rm_ckpt['response_len']

    if mode == 'eval':  # ppo.py's evaluation again, with the settings and seeds it used (from ppo.pt)
        if 'ppo_path' not in model_ckpt.get('metrics', {}):
            die(f'eval mode evaluates the PPO policy: run python ppo.py first ({path} is not a PPO checkpoint)')
        prepare_out_dir(out_dir)                                 # eval.json goes there
        t0 = time.time()
        c = model_ckpt['config']
        base, _, _ = load_model(os.path.join(out_dir, 'gpt.pt'), device=device)
        _, val_data, _ = load_splits(data_path, vocab)
        held_out = held_out_prompts(val_data, c['eval_prompts'], c['prompt_len'], c['seed'], device)
        curve, samples = best_of_n_frontier(base, rm, held_out, vocab, c['response_len'], c['temperature'],
                                            c['best_of_max'], c['seed'])
        final, ppo_samples = policy_point(model, base, rm, held_out, vocab, c['response_len'], c['temperature'],
                                          c['eval_samples'], c['seed'], c['max_iters'])
        result = summary(curve, final, samples, ppo_samples, held_out, vocab)
        with open(os.path.join(out_dir, 'eval.json'), 'w') as f:
            json.dump(result, f, indent=2)
        print_frontier(curve, model_ckpt['metrics']['ppo_path'][:-1] + [final], result)
        print_samples(result)
        print(f'{time.time() - t0:.1f} s; best-of-n and the final PPO policy measured again (the earlier PPO '
              f'points are read from {path}); written to {out_dir}/eval.json')

    elif mode == 'sample':
        prompt = start
        if start.startswith('FILE:'):
            if not os.path.exists(start[5:]):
                die(f'no prompt file {start[5:]}')
            with open(start[5:], encoding='utf-8') as f:
                prompt = f.read()
        prompt = prompt.encode().decode('unicode_escape') if '\\n' in prompt else prompt  # --start='A:\nB'
        encode(prompt, vocab)                                    # names any character the model lacks
        for text, r, p in answer(model, rm, vocab, prompt, num_samples, gen):
            print(prompt + text)
            print(f'--- reward {r:+.3f}, P(preferred to a typical base answer) = {p:.3f}' +
                  (f' (best of {best_of})' if best_of > 1 else ''))

    else:  # chat
        turns = []
        room = max(model.config.block_size - max_new_tokens, model.config.block_size // 2)
        print(f'You are {you}; {bard} answers. An empty line, Ctrl-D or Ctrl-C ends the scene.', file=sys.stderr)
        while True:
            try:
                line = input(f'{you}: ')
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                break
            if not sys.stdin.isatty():                            # piped: show the line, as a terminal would
                print(line)
            line, dropped = clean(line.strip(), vocab)
            if dropped:
                print(f'note: the bard knows no {dropped!r}; left out', file=sys.stderr)
            if not line:
                break
            turns.append((you, line))
            t0 = time.time()
            text, r, p = answer(model, rm, vocab, format_chat(turns, bard, room), 1, gen)[0]
            text = end_of_turn(text)
            turns.append((bard, text))
            print(f'{bard}: {text}\n   [P = {p:.2f}, reward {r:+.2f}, {time.time() - t0:.1f} s]')
