"""
expert_iteration.py: expert iteration: the RM's best of n answers, fine-tuned on, round after round.

The simplest road from a reward model to a policy, AlpacaFarm's "expert iteration" (Dubois et al.
2023), also rejection-sampling fine-tuning (Llama 2, Touvron et al. 2023, section 3.2.3), RAFT
(Dong et al. 2023) and ReST's Grow and Improve steps (Gulcehre et al. 2023). On minibard's data:
 1. The policy starts as the reference (`policy`: out/sft.pt; gpt.pt on the road without SFT),
    which stays frozen: the KL of every point is to it. Dropout off, as in PPO and DPO.
 2. A round: `prompts_per_round` fresh speech starts of the training text (as reward.py and
    ppo.py draw them), `n` answers to each from the CURRENT policy (whole turns, at
    `temperature`), scored by the RM; each prompt's best answer is kept (frontier.best_of_n):
    best-of-n distilled into the policy. With `threshold`, only those the RM scores above it (a
    filter on the reward, as RAFT's and ReST's; ReST raises it from one Improve step to the next,
    here it stays).
 3. Fine-tuning on the kept answers with sft.py's loss (the import of another step that
    DESIGN.md allows here: this is SFT on the answers the RM chose), the prompt masked:
    L = -1/N sum_b sum_{t < len_b} log pi(y_{b,t} | x_b, y_{b,<t}),  N = sum_b len_b.
    `steps_per_round` AdamW steps at a constant lr over shuffled minibatches, one AdamW for all
    rounds, grad-norm clip. The policy goes on from where the last round left it (RAFT, Llama 2),
    not from the reference each round (as ReST-EM does, Singh et al. 2023).
    Early stopping, as sft.py's: the same loss on `val_prompts` RM-kept answers to prompts of speech
    starts held aside (every 16th of the training text's, never trained on), before the first step
    and every `val_interval` steps; the round ends at its step of lowest loss (weights and AdamW
    state). Never by gold.
 4. `rounds` rounds. Every round's policy is a point of its path on the frontier (frontier.RunPath:
    gold, RM score, exact KL to the reference on the held-out prompts every step uses); round 0 is
    the reference. Gold is only measured: no round is chosen by it, the last is saved.
 Left out: no KL penalty or anchor to the reference (the KL grows with each round, as best-of-n's
 with n; the number of rounds is the knob), no mixing in of older rounds' answers (Llama 2's later
 rounds).
 n = 1 is plain self-distillation: the policy trained on its own samples, which moves it little.

Run:  python expert_iteration.py           (after sft.py and reward.py)
      python expert_iteration.py --n=16    (a harder pick each round: further, faster)
      python expert_iteration.py --policy=gpt.pt  (the road without SFT, with its own reward.pt)
Writes out/expert_iteration.pt, out/expert_iteration.json (path: a row per round of gold, gold_se,
rm, kl, length, ended, ...; kept: what each round trained on), and redraws out/frontier.csv and
.png (frontier.py).
"""
import copy
import json
import math
import os
import sys
import time

import torch

from configurator import ByDevice, configure
from data import END_OF_TURN, encode, load_splits, sample_prompts, turn_starts
from frontier import RunPath, best_of_n, held_out_prompts, print_rows
from model import GPT, GPTConfig, load_policy_and_rm
from plumbing import (die, eta, made_from, prepare_out_dir, progress, refuse_to_replace, save_checkpoint,
                      share_done)
from sft import sft_loss

# ----------------------------------------------------------------------------------------
# hyperparameters (`--key=value` overrides any of them)
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', ...; sizes follow it
out_dir = 'out'                 # reads <policy> and reward.pt, writes expert_iteration.pt and .json
data_path = 'input.txt'         # training prompts from its training part, held-out ones from the rest
policy = 'sft.pt'               # a checkpoint of out_dir: the start and the reference (gpt.pt: no SFT)
seed = 1337                     # in [0, inf): prompts, answers, shuffles, the held-out prompts
rounds = 3                      # in [1, inf): sample, keep the best, fine-tune: this many times
prompts_per_round = 768         # in [1, inf): fresh training prompts a round
n = 12                          # in [1, inf): answers sampled a prompt, the RM's best kept (1: self-distil)
threshold = None                # float in (-inf, inf) or None: keep only best answers scored above it
steps_per_round = 48            # in [1, inf): AdamW steps on the kept answers a round (48 x 32: 2 passes)
val_prompts = 128               # in [0, inf): held-aside prompts that early-stop each round (0: none)
val_interval = 8                # in [1, inf): steps between two losses on those answers
batch_size = 32                 # in [1, inf): kept answers a step
learning_rate = 5e-5            # in (0, inf): AdamW, constant
grad_clip = 1.0                 # in (0, inf): global grad-norm clip
temperature = 1.0               # in (0, inf): of the sampled answers, the measured ones and the KL
sample_batch = ByDevice(cpu=1024, cuda=4096)  # in [1, inf): answers a generate() call
forward_batch_size = ByDevice(cpu=32, cuda=256)  # in [1, inf): sequences a no-grad forward (CPU: in cache)
eval_prompts = 256              # in [1, inf): held-out prompts, as ppo.py
eval_samples = 2                # in [1, inf): answers per held-out prompt at each point of the path
allow_stale = False             # go on from checkpoints made from older ones than those there now
# ----------------------------------------------------------------------------------------


def keep_best(prompts, answers, lengths, scores, threshold):
    """The answers to keep of n per prompt: each prompt's RM favourite, and with a threshold only
    those scored above it. prompts (P, Tp); answers (P, n, Ta), lengths and scores (P, n) ->
    seqs (K, Tp + Ta) prompt and kept answer, lengths (K,), scores (K,), K <= P."""
    best = scores.argmax(1)  # (P,) k* = argmax_k r(x, y_k), the first of equals
    rows = torch.arange(len(prompts), device=scores.device)
    best_scores = scores[rows, best]  # (P,)
    keep = rows if threshold is None else rows[best_scores > threshold]  # r(x, y_k*) > threshold
    seqs = torch.cat([prompts[keep], answers[keep, best[keep]]], 1)  # (K, Tp + Ta)
    return seqs, lengths[keep, best[keep]], best_scores[keep]


@torch.no_grad()
def mean_loss(model, seqs, lengths, prompt_len, batch_size):
    """sft.py's loss over all of seqs (K, Tp + Ta), lengths (K,), in batches: the mean of
    -log pi over every answer character, each batch weighted by its characters."""
    total = 0.0
    for b in torch.arange(len(seqs), device=seqs.device).split(batch_size):
        nb = lengths[b]
        loss = sft_loss(model, seqs[b, :prompt_len + int(nb.max())], nb, prompt_len)
        total += loss.item() * nb.sum().item()
    return total / lengths.sum().item()


def fine_tune(model, optimizer, seqs, lengths, prompt_len, steps, batch_size, grad_clip, generator,
              val=None, val_interval=8):
    """`steps` AdamW steps of sft.py's masked loss on the kept answers seqs (K, Tp + Ta), lengths
    (K,): minibatches of batch_size, a new shuffle each pass over them, each batch cut to its
    longest answer. With val = (seqs, lengths) of held-aside answers: their loss before the first
    step, every val_interval steps and after the last, and the model and optimizer are left as
    they were at the lowest (early stopping). -> (the loss of each step (none without a kept
    answer), [(step, val loss), ...]). A NaN/inf loss raises FloatingPointError before the update,
    so nothing bad is saved."""
    K, losses, val_log, best = len(seqs), [], [], None

    def validate():  # the held-aside loss now, and a copy of the state if it is the lowest so far
        nonlocal best
        loss = mean_loss(model, *val, prompt_len, batch_size)
        val_log.append((len(losses), loss))
        if best is None or loss < best[0]:
            best = loss, copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())

    if val is not None:
        validate()
    while K and len(losses) < steps:
        for b in torch.randperm(K, generator=generator).to(seqs.device).split(batch_size):  # one pass
            if len(losses) == steps:
                break
            nb = lengths[b]  # L = -1/N sum_b sum_{t < len_b} log pi(y_{b,t} | x_b, y_{b,<t}), N = sum_b len_b
            loss = sft_loss(model, seqs[b, :prompt_len + int(nb.max())], nb, prompt_len)  # prompt masked
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f'loss is {loss.item()} at step {len(losses) + 1}')
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            losses.append(loss.item())
            if val is not None and (len(losses) % val_interval == 0 or len(losses) == steps):
                validate()
    if best is not None and best[0] < val_log[-1][1]:  # back to the step of the lowest held-aside loss
        model.load_state_dict(best[1])
        optimizer.load_state_dict(best[2])
    return losses, val_log


if __name__ == '__main__':
    config = configure(globals(), sys.argv[1:])  # each option against its rule, then:
    name, t_start = 'expert_iteration', time.time()
    prepare_out_dir(out_dir, name)
    ckpt_path, budget = os.path.join(out_dir, f'{name}.pt'), rounds * steps_per_round * batch_size
    refuse_to_replace(ckpt_path, budget, 'kept answers')
    torch.manual_seed(seed)
    reference = config['reference'] = policy  # the start, and the KL's reference
    parents = os.path.join(out_dir, reference), os.path.join(out_dir, 'reward.pt')
    ref, vocab, _, rm, rm_checkpoint = load_policy_and_rm(*parents, device, allow_stale)
    if rm_checkpoint.get('policy') != reference:  # whose answers the RM learnt from
        print(f"note: reward.pt learnt from answers of {rm_checkpoint.get('policy')}, and expert iteration "
              f'starts from {reference}: for one road, give both stages the same --policy', file=sys.stderr)
    Tp = config['prompt_len'] = rm_checkpoint['prompt_len']  # the turns the RM was trained on
    max_len = config['max_answer_len'] = rm_checkpoint['max_answer_len']
    if Tp + max_len > ref.config.block_size:
        die(f'reward.pt reads prompt_len + max_answer_len = {Tp + max_len} characters, more than the '
            f'block_size {ref.config.block_size} of {reference}: run python reward.py --policy={reference} '
            'again')
    train_data, val_data, _ = load_splits(data_path, vocab)
    stop = config['stop'] = encode(END_OF_TURN, vocab)
    ref.requires_grad_(False), rm.requires_grad_(False)  # frozen
    model = GPT(GPTConfig(**dict(ref.config.__dict__, dropout=0.0))).to(device).eval()  # the policy
    model.load_state_dict(ref.state_dict())
    prompt_gen, starts = torch.Generator().manual_seed(seed), turn_starts(train_data, vocab, Tp)
    sample_gen, shuffle_gen = torch.Generator(device).manual_seed(seed), torch.Generator().manual_seed(seed)
    aside = torch.zeros(len(starts), dtype=torch.bool)
    aside[::16] = val_prompts > 0  # every 16th speech start only validates: its prompts are never trained on
    if val_prompts and len(starts) < 2:
        die(f'the training text has {len(starts)} speech start: early stopping needs one held aside and '
            'one to train on; add --val_prompts=0')
    starts, val_starts = starts[~aside], starts[aside]
    val_gen = torch.Generator().manual_seed(seed + 1)  # the held-aside prompts and their answers: own streams
    val_sample_gen = torch.Generator(device).manual_seed(seed + 1)
    held_out = held_out_prompts(val_data, vocab, eval_prompts, Tp, seed, device)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    print(f'{time.time() - t_start:.1f}s: expert iteration from {reference}, {rounds} round(s) of '
          f"{prompts_per_round} prompts x {n} answers of <= {max_len} chars, the RM's best kept"
          + ('' if threshold is None else f' if above {threshold:g}')
          + f', {steps_per_round} steps x {batch_size} a round'
          + (f', early-stopped on {val_prompts} held-aside prompts' if val_prompts else '')
          + f', device {device}')

    path = RunPath(name, model, ref, rm, held_out, vocab, max_len, stop, temperature, eval_samples, seed,
                   forward_batch_size)
    path.add(0)
    kept_log, t0 = [], time.time()
    for r in range(1, rounds + 1):
        # ---- sample n answers a prompt from the current policy, keep the RM's favourite
        prompts = sample_prompts(train_data, starts, prompts_per_round, Tp, prompt_gen).to(device)  # (P, Tp)
        advance = progress(f'round {r} answers', (prompts_per_round + val_prompts) * n, 4 * sample_batch)
        *_, answers, lengths, scores = best_of_n(model, rm, prompts, n, max_len, stop, temperature,
                                                 sample_gen, sample_batch, on_progress=advance,
                                                 chunk=forward_batch_size)  # (P, n, Ta), (P, n), (P, n)
        seqs, kept_lengths, kept_scores = keep_best(prompts, answers, lengths, scores, threshold)  # K kept
        # ---- fine-tune on them: SFT on the answers the RM chose
        K = len(seqs)
        if K == 0:
            print(f'note: round {r}: no answer scored above --threshold={threshold:g} (the best: '
                  f'{scores.max().item():.2f}): the policy stays as it was', file=sys.stderr)
            kept_log.append({'round': r, 'kept': 0, 'rm_all': scores.mean().item()})
            path.add(r)
            continue
        val = None  # the same pick on held-aside prompts: the answers that early-stop the round
        if val_prompts:
            vp = sample_prompts(train_data, val_starts, val_prompts, Tp, val_gen).to(device)  # (V, Tp)
            *_, va, vl, vs = best_of_n(model, rm, vp, n, max_len, stop, temperature, val_sample_gen,
                                       sample_batch, on_progress=advance, chunk=forward_batch_size)
            val = keep_best(vp, va, vl, vs, threshold)[:2]  # seqs (V', Tp + Ta), lengths (V',)
            val = val if len(val[0]) else None  # (none above the threshold: no early stop this round)
        try:
            losses, val_log = fine_tune(model, opt, seqs, kept_lengths, Tp, steps_per_round, batch_size,
                                        grad_clip, shuffle_gen, val, val_interval)
        except FloatingPointError as e:
            die(f'{e} of round {r}: stopped; {ckpt_path} was not written. Try a lower --learning_rate '
                f'(now {learning_rate:g})')
        half = max(1, len(losses) // 2)  # the loss over the first and the last half of the round's steps
        kept = {'round': r, 'kept': K, 'rm_all': scores.mean().item(), 'rm_kept': kept_scores.mean().item(),
                'length_kept': kept_lengths.float().mean().item(), 'loss_start': sum(losses[:half]) / half,
                'loss_end': sum(losses[-half:]) / half}
        held = ''
        if val_log:  # the step the round ended at: the lowest loss on the held-aside answers
            kept['val_loss'] = val_log  # [(step, loss), ...]
            kept['best_step'], low = min(val_log, key=lambda v: v[1])
            held = f", held-aside loss {val_log[0][1]:.4f} -> {low:.4f}, kept step {kept['best_step']}"
        kept_log.append(kept)
        print(f"round {share_done(r, rounds)}: kept {K}/{prompts_per_round}, rm {kept['rm_kept']:.3f} kept "
              f"(all {kept['rm_all']:.3f}), length {kept['length_kept']:.0f}, loss {kept['loss_start']:.4f} "
              f"-> {kept['loss_end']:.4f} (halves of {len(losses)} steps){held}, {eta(r, rounds, t0)}")
        path.add(r)

    final = path.rows[-1]
    metrics = {'policy': reference, 'reference': reference, 'seed': seed, 'eval_prompts': eval_prompts,
               'rounds': rounds, 'n': n, 'threshold': threshold, 'seconds': round(time.time() - t_start, 1),
               'kept': kept_log,
               'eval': {name: {**{k: final[k] for k in final if k not in ('method', 'n', 'step')},
                               'samples': path.samples}}, 'path': path.rows}
    save_checkpoint({'model': model.state_dict(), 'model_args': dict(model.config.__dict__), 'config': config,
                     'vocab': vocab, 'iter_num': rounds, 'metrics': json.loads(json.dumps(metrics)),
                     'budget': budget, 'made_from': made_from(*parents)}, ckpt_path)
    path.save(out_dir, metrics, [f'{name}.json'])  # and the frontier of every run in out_dir, this one too
    print('-' * 72)
    print_rows(path.rows)
    for i, s in enumerate(path.samples):
        print(f'--- held-out prompt {i}: {s!r}')
    print(f"seconds {metrics['seconds']}")
