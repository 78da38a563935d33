r"""
sample.py: talk to the bard. Step 4 of minibard: ask, read, compare.

Every answer comes with its reward-model score r and P = sigmoid(r). The RM is normalised so
that answers of the policy it learnt from (the SFT model; the pretrained one on the road without
SFT) score 0 on average, so by Bradley-Terry P reads: "the probability the labeler prefers this
answer to a typical answer of that policy" (0.5 = as good as it).
P is calibrated for what the RM was trained on, whole turns of up to max_answer_len characters
(see ece in out/reward.json). Longer text is scored over the last window the RM can read, and
the output says so.

Run:
    python sample.py                                  # 3 continuations of --start, each with P
    python sample.py --start='ROMEO:\nO gentle' --best_of=16   # keep the RM's favourite of 16
    python sample.py --start=FILE:prompt.txt --ckpt=gpt --max_new_tokens=500   # any length
    python sample.py --mode=chat                      # you speak as ROMEO, the bard answers as JULIET
    echo 'What light through yonder window breaks?' | python sample.py --mode=chat
    python sample.py --mode=eval                      # ppo.py's gold-vs-KL frontier again -> out/eval.json
"""
import json
import os
import re
import sys
import time

import torch

from frontier import best_of_n, best_of_n_frontier, policy_point, print_frontier, print_samples, summary
from gpt import load_gpt
from plumbing import (END_OF_TURN, answer_texts, configure, die, encode, load_splits, prepare_out_dir,
                      run_first)
from reward import load_reward_model, score
from sft import held_out_prompts

# ----------------------------------------------------------------------------------------
# hyperparameters (`--key=value` overrides any of them)
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', ...; sizes follow it
out_dir = 'out'
data_path = 'input.txt'         # eval mode: held-out prompts come from its validation part
ckpt = 'ppo'                    # 'ppo', 'sft', 'gpt', or a path to any checkpoint; ppo falls back to sft, gpt
mode = 'sample'                 # in {'sample', 'chat', 'eval'}: 'sample', 'chat' or 'eval'
start = '\n'                    # sample mode's prompt, or 'FILE:path' to read it from a file
num_samples = 3                 # in [1, inf): continuations printed in sample mode
max_new_tokens = None           # int in [1, inf) or None: sample mode's length; None = the RM's
temperature = 1.0               # in [0, inf): the PPO policy was trained at 1.0
top_k = None                    # int in [1, inf) or None: only the k likeliest characters (None: all)
best_of = 1                     # in [1, inf): draw n answers, keep the RM's favourite (1 = plain sampling)
seed = 1337                     # in [0, inf)
you = 'ROMEO'                   # chat: the character you speak as
bard = 'JULIET'                 # chat: the character the model answers as; a whole turn each time
# ----------------------------------------------------------------------------------------
TAG = re.compile(r"\n[A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*){0,3}:\n")  # a speaker's name on a line of its own


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
    tag = TAG.search('\n' + text + '\n')                      # also a name on the answer's first line
    if tag:
        text, ended_here = text[:max(0, tag.start() - 1)], True
    return text.strip('\n'), ended_here


def answer(model, rm, vocab, prompt, n_answers, max_len, stop, gen, best_of=1, temperature=1.0, top_k=None):
    """n_answers continuations of one prompt string, each the RM's favourite of best_of, ended by
    the tokens `stop` (None: run to max_len): [(text, reward, P)]."""
    dev = next(model.parameters()).device
    ids = torch.tensor([encode(prompt, vocab)], device=dev).repeat(n_answers, 1)  # (n, T)
    y, lengths, r, *_ = best_of_n(model, rm, ids, best_of, max_len, stop, temperature, gen, top_k=top_k)
    texts = answer_texts(y, lengths, vocab)
    return [(text, r[i].item(), torch.sigmoid(r[i]).item()) for i, text in enumerate(texts)]


if __name__ == '__main__':
    config = configure(globals(), sys.argv[1:])                      # each option against its rule
    torch.manual_seed(seed)
    gen = torch.Generator(device).manual_seed(seed)
    if mode == 'eval' and best_of != 1:
        die(f"--best_of={best_of} is for sample and chat modes: eval mode measures best-of-n for every n "
            f"up to ppo.py's --best_of_max")
    path = checkpoint_path(ckpt, out_dir)
    model, vocab, checkpoint = load_gpt(path, run_first(path), device=device)
    rm, rm_vocab, rm_checkpoint = load_reward_model(os.path.join(out_dir, 'reward.pt'), device=device)
    if rm_vocab != vocab:
        die(f'{path} and {out_dir}/reward.pt use different vocabularies: retrain them from the same gpt.pt')
    max_answer_len = rm_checkpoint['max_answer_len']            # the turns the RM was calibrated on
    labelled = rm_checkpoint.get('policy', 'gpt.pt').removesuffix('.pt')   # whose answers score 0 on average
    max_new_tokens = max_new_tokens or max_answer_len

    if mode == 'eval':  # ppo.py's evaluation again, with the settings and seeds it used (from ppo.pt)
        if 'best_of_n' not in checkpoint.get('metrics', {}).get('eval', {}):
            die(f'eval mode measures a run of ppo.py again (PPO, or --advantage=rloo or grpo): {path} is '
                'not one; run python ppo.py first')
        prepare_out_dir(out_dir)                                 # eval.json goes there
        t0 = time.time()
        c = checkpoint['config']
        reference = c.get('reference', 'gpt.pt')                   # the policy PPO started from
        ref, _, _ = load_gpt(os.path.join(out_dir, reference), run_first(reference), device=device)
        _, val_data, _ = load_splits(data_path, vocab)
        held_out = held_out_prompts(val_data, vocab, c['eval_prompts'], c['prompt_len'], c['seed'], device)
        print(f"best-of-n, n = 1..{c['best_of_max']}, on {c['eval_prompts']} held-out prompts ...")
        curve, samples = best_of_n_frontier(ref, rm, held_out, vocab, c['max_answer_len'], c['stop'],
                                            c['temperature'], c['best_of_max'], c['seed'], log=print)
        print(f"{time.time() - t0:.1f}s: the PPO policy, {c['eval_samples']} answers per prompt ...")
        method = checkpoint['metrics']['path'][-1]['method']   # ppo, rloo or grpo
        final, ppo_samples = policy_point(model, ref, rm, held_out, vocab, c['max_answer_len'], c['stop'],
                                          c['temperature'], c['eval_samples'], c['seed'], c['max_iters'],
                                          method=method)
        result = summary(curve, final, samples, ppo_samples, held_out, vocab)
        with open(os.path.join(out_dir, 'eval.json'), 'w') as f:
            json.dump(result, f, indent=2)
        print_frontier(curve, checkpoint['metrics']['path'][:-1] + [final], result)
        print_samples(result, method)
        print(f'{time.time() - t0:.1f} s; best-of-n and the final PPO policy measured again (the earlier PPO '
              f'points are read from {path}); written to {out_dir}/eval.json')

    elif mode == 'sample':
        prompt = start
        if start.startswith('FILE:'):
            try:
                with open(start[5:], encoding='utf-8') as f:
                    prompt = f.read()
            except (OSError, UnicodeDecodeError) as e:
                die(f'cannot read the prompt file {start[5:]}: {e}')
        prompt = prompt.replace('\\n', '\n')                    # --start='A:\\nB' means a newline
        if not prompt:
            die(f'the prompt {start!r} is empty: the model needs at least one character to go on from')
        encode(prompt, vocab)                                    # names any character the model lacks
        window = rm.trunk.config.block_size                      # answer characters the RM reads at most
        if max_new_tokens > max_answer_len:
            print(f'note: the RM was calibrated on turns of up to {max_answer_len} characters; P below is '
                  f'over the last {min(max_new_tokens, window)} it reads, not calibrated', file=sys.stderr)
        for text, r, p in answer(model, rm, vocab, prompt, num_samples, max_new_tokens, None, gen, best_of,
                                  temperature, top_k):
            print(prompt + text)
            print(f'--- reward {r:+.3f}, P(preferred to a typical {labelled} answer) = {p:.3f}' +
                  (f' (best of {best_of})' if best_of > 1 else ''))

    else:  # chat: a whole turn each time, up to the blank line (or max_answer_len characters)
        turns, stop = [], encode(END_OF_TURN, vocab)
        encode(you + bard, vocab)                                 # names any character the model lacks
        room = model.config.block_size - max_answer_len           # the conversation keeps what fits here
        print(f'You are {you}; {bard} answers. An empty line, Ctrl-D or Ctrl-C ends the scene.',
              file=sys.stderr)
        while True:
            try:
                line = input(f'{you}: ')
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                break
            if not sys.stdin.isatty():                            # piped: show the line, as a terminal would
                print(line)
            if not line.strip():                                   # an empty line ends the scene
                break
            line, dropped = clean(line.strip(), vocab)
            if dropped:
                print(f'note: the bard knows no {dropped!r}; left out', file=sys.stderr)
            if not line:                                          # nothing the bard can read: ask again
                continue
            turns.append((you, line))
            t0 = time.time()
            prompt = format_chat(turns, bard, room)
            for _ in range(5):                                    # a turn that says nothing is drawn again
                drawn = answer(model, rm, vocab, prompt, 1, max_answer_len, stop, gen, best_of, temperature,
                               top_k)[0][0]                        # the one answer's text
                text, done = end_of_turn(drawn)
                if text.strip():
                    break
            said = text + END_OF_TURN if done else text                # the turn as the RM reads turns
            r = score(rm, torch.tensor([encode(prompt + said, vocab)], device=device), len(prompt)).item()
            p = torch.sigmoid(torch.tensor(r)).item()
            turns.append((bard, text))
            print(f'{bard}: {text}\n   [P = {p:.2f}, reward {r:+.2f}, {time.time() - t0:.1f} s'
                  + ('' if done else f', cut at {max_answer_len} characters') + ']')
