"""
dpo.py: Direct Preference Optimisation on the very pairs reward.py labelled. The road beside PPO.

The recipe (Rafailov et al. 2023), on minibard's data:
 1. Data: out/preferences.pt, written by reward.py: K answers of the reference policy to each of
    its training prompts, and the labeler's choice in all K(K-1)/2 pairs of each prompt. Nothing
    is sampled and no reward model is trained on; reward.pt only measures the result.
 2. The policy starts as the reference, the policy whose answers were labelled (`policy`: out/sft.pt;
    gpt.pt on the road without SFT), which stays frozen: its log-probabilities of every answer are
    computed once, before training.
 3. Loss: with the implicit reward r(x, y) = beta h(y), h(y) = log pi(y|x) - log pi_ref(y|x) summed
    over the answer's characters, the Bradley-Terry loss of reward.py on each labelled pair:
    L = -log sigmoid(beta [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))]),
    averaged over the K(K-1)/2 pairs of a prompt, all K answers in one batch (each forwarded once).
    At pi = pi_ref every h is 0 and L = log 2.
 4. AdamW, lr decaying linearly to 0 over `epochs` passes over the prompts, dropout off. Every
    `eval_interval` steps the policy is measured on the held-out prompts ppo.py uses
    (frontier.RunPath: gold, RM score, exact KL to the reference, length, ended): its path.
 5. Its known failure modes are logged: the chosen answers' log-ratio h(y_w), which falls in many
    DPO runs although the loss falls (trl #800; the DPO authors' issues #32, #36), the rejected
    ones' h(y_l), and the answers' length (the labeler's gold grows with the words said).

Run:  python dpo.py              (after reward.py; times and numbers: README)
      python dpo.py --beta=1    (a larger beta: a stronger pull back to the reference)
Writes out/dpo.pt, out/dpo.json (beta, path: rows of gold, gold_se, rm, kl, length, ended, beta) and
the same as out/dpo_beta<beta>.json, so that runs of several beta stand side by side; redraws
out/frontier.csv and .png (frontier.py).
"""
import copy
import json
import math
import os
import sys
import time

import torch

from configurator import ByDevice, configure
from data import END_OF_TURN, answer_mask, encode, forward_in_chunks, load_splits
from frontier import RunPath, held_out_prompts, print_rows
from labeler import all_pairs, pair_metrics
from model import answer_logits, load_policy_and_rm, token_logprobs
from plumbing import (die, eta, load_checkpoint, made_from, prepare_out_dir, refuse_to_replace,
                      save_checkpoint, share_done)
from reward import pairwise_loss

# ----------------------------------------------------------------------------------------
# hyperparameters (`--key=value` overrides any of them)
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', ...; sizes follow it
out_dir = 'out'                 # reads preferences.pt, <policy>, reward.pt; writes dpo.pt, dpo.json
data_path = 'input.txt'         # the held-out prompts come from its validation part
policy = 'sft.pt'               # a checkpoint of out_dir: the start and the reference (gpt.pt: no SFT)
seed = 1337                     # in [0, inf): shuffles and the held-out prompts (as ppo.py's --seed)
beta = 0.3                      # in (0, inf): the implicit reward's scale: larger stays nearer pi_ref
learning_rate = 1e-4            # in (0, inf): AdamW, decaying linearly to 0
epochs = 1                      # in [1, inf): passes over the labelled prompts
prompts_per_batch = 1           # in [1, inf): prompts a step: K answers, K(K-1)/2 pairs each
grad_clip = 1.0                 # in (0, inf): global grad-norm clip
forward_batch_size = ByDevice(cpu=32, cuda=256)  # in [1, inf): sequences a no-grad forward (CPU: in cache)
eval_prompts = 256              # in [1, inf): held-out prompts, as ppo.py
eval_samples = 2                # in [1, inf): answers per held-out prompt at each point of the path
eval_interval = 125             # in [1, inf): measure the policy every this many steps
temperature = 1.0               # in (0, inf): of the measured answers and of the KL
log_interval = 25               # in [1, inf)
allow_stale = False             # go on from checkpoints made from older ones than those there now
# ----------------------------------------------------------------------------------------

def answer_logprobs(model, seqs, lengths, prompt_len):
    """log pi(y|x) summed over each answer's characters: seqs (B, Tp + Ta), lengths (B,) -> (B,)."""
    logp = token_logprobs(answer_logits(model(seqs)[0], prompt_len), seqs[:, prompt_len:])  # (B, Ta)
    return (logp * answer_mask(lengths, logp.size(1))).sum(1)


def dpo_loss(logp, ref_logp, prefs, beta):
    """DPO's loss (Rafailov et al. 2023, eq. 7) on all pairs of each prompt: logp, ref_logp (P, K)
    summed answer log-probs under pi and pi_ref; prefs (P, K(K-1)/2) 1 where y_i beat y_j.

    h = log pi(y) - log pi_ref(y);  L = -mean over pairs of log sigmoid(beta (h_w - h_l)):
    reward.py's Bradley-Terry loss with the implicit reward beta h. -> (loss, pair accuracy)."""
    return pairwise_loss(beta * (logp - ref_logp), prefs)


@torch.no_grad()
def all_logprobs(model, seqs, lengths, prompt_len, chunk):
    """answer_logprobs over many answers (N, Tp + Ta), in chunks cut to their longest answer."""
    return forward_in_chunks(lambda s, n: answer_logprobs(model, s, n, prompt_len), seqs, lengths, prompt_len,
                             chunk)


if __name__ == '__main__':
    config = configure(globals(), sys.argv[1:])  # each option against its rule, then:
    t_start = time.time()
    prepare_out_dir(out_dir, 'dpo')
    torch.manual_seed(seed)
    parents = os.path.join(out_dir, 'preferences.pt'), os.path.join(out_dir, policy)
    data = load_checkpoint(parents[0], 'python reward.py', 'preference data', allow_stale)
    try:  # K answers to P prompts (V held out) and all their pairs, as reward.py writes them
        (P, K, T), (V, K_val, _) = data['train']['seqs'].shape, data['val']['seqs'].shape
        shapes = [data[s][k].shape for s in ('train', 'val') for k in ('lengths', 'prefs', 'g')]
        assert shapes == [(P, K), (P, K * (K - 1) // 2), (P, K), (V, K_val), (V, K_val * (K_val - 1) // 2),
                          (V, K_val)] and min(P, V, K - 1, K_val - 1) > 0
    except (KeyError, TypeError, ValueError, AttributeError, AssertionError):
        die(f'{parents[0]} is not preference data as reward.py writes it: run python reward.py again')
    refuse_to_replace(os.path.join(out_dir, 'dpo.pt'), epochs * P * K * (K - 1) // 2, 'labelled pairs')
    if data['policy'] != policy:
        print(f"note: {out_dir}/preferences.pt holds answers of {data['policy']}, and DPO starts from "
              f"{policy}: for one road, give both stages the same --policy", file=sys.stderr)
    ref, vocab, ref_checkpoint, rm, _ = load_policy_and_rm(  # the RM only measures
        parents[1], os.path.join(out_dir, 'reward.pt'), device, allow_stale)
    if data['vocab'] != vocab:
        die(f'{out_dir}/preferences.pt and {policy} do not share one vocabulary: run python reward.py '
            f'--policy={policy} again')
    ref.requires_grad_(False)
    model = copy.deepcopy(ref).requires_grad_(True)  # eval(): dropout off, as in PPO
    Tp, train = data['prompt_len'], data['train']
    seqs = train['seqs'].long().view(P * K, T).to(device)  # (P K, Tp + Ta)
    lengths = train['lengths'].flatten().to(device)  # (P K,)
    prefs = train['prefs'].to(device)  # (P, K(K-1)/2)
    ref_logp = all_logprobs(ref, seqs, lengths, Tp, forward_batch_size).view(P, K)  # log pi_ref(y), once
    _, val_data, _ = load_splits(data_path, vocab)
    held_out = held_out_prompts(val_data, vocab, eval_prompts, Tp, seed, device)
    stop = encode(END_OF_TURN, vocab)
    max_len = data['max_answer_len']
    print(f"{time.time() - t_start:.1f}s: DPO on {P} prompts x {K} answers of {data['policy']} "
          f"({prefs.numel()} labelled pairs), beta {beta}, {epochs} epoch(s), device {device}")

    path = RunPath('dpo', model, ref, rm, held_out, vocab, max_len, stop, temperature, eval_samples, seed,
                   forward_batch_size, beta=beta)
    path.add(0)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    steps = max(1, epochs * (P // prompts_per_batch))
    gen, t0, run = torch.Generator().manual_seed(seed), time.time(), None
    i, j = all_pairs(K)  # the pairs prefs labels, in its order
    for step in range(steps):
        for group in opt.param_groups:
            group['lr'] = learning_rate * (1 - step / steps)  # linear decay to 0
        if step % (P // prompts_per_batch or 1) == 0:
            order = torch.randperm(P, generator=gen)  # a new shuffle each epoch
        b = order[(step % (P // prompts_per_batch or 1)) * prompts_per_batch:][:prompts_per_batch]
        rows = (b[:, None] * K + torch.arange(K)).flatten().to(device)  # the K answers of each prompt
        n = lengths[rows]
        logp = answer_logprobs(model, seqs[rows, :Tp + int(n.max())], n, Tp).view(len(b), K)  # (b, K)
        loss, acc = dpo_loss(logp, ref_logp[b], prefs[b], beta)
        if not math.isfinite(loss.item()):
            die(f'DPO loss is {loss.item()} at step {step}: try a lower --learning_rate or --beta (now '
                f'{learning_rate:g}, {beta:g}); {out_dir}/dpo.pt was not written')
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        with torch.no_grad():  # h of the chosen and the rejected
            h = (logp - ref_logp[b]).detach()
            won = prefs[b] > 0.5
            h_w = torch.where(won, h[:, i], h[:, j]).mean().item()
            h_l = torch.where(won, h[:, j], h[:, i]).mean().item()
        stats = torch.tensor([loss.item(), acc.item(), h_w, h_l])
        run = stats if run is None else 0.95 * run + 0.05 * stats
        if (step + 1) % log_interval == 0:
            print(f'iter {share_done(step + 1, steps)}: loss {run[0]:.4f}, acc {run[1]:.3f}, '
                  f'chosen h {run[2]:+.2f}, rejected h {run[3]:+.2f}, lr {opt.param_groups[0]["lr"]:.2e}, '
                  f'{eta(step + 1, steps, t0)}')
        if (step + 1) % eval_interval == 0 or step + 1 == steps:
            path.add(step + 1)

    # the implicit reward beta h on the held-out labelled pairs: how well DPO learnt the labels
    val = data['val']
    vP, vK, vT = val['seqs'].shape
    vseqs, vlen = val['seqs'].long().view(vP * vK, vT).to(device), val['lengths'].flatten().to(device)
    h_val = (all_logprobs(model, vseqs, vlen, Tp, forward_batch_size)
             - all_logprobs(ref, vseqs, vlen, Tp, forward_batch_size)).view(vP, vK).cpu()
    implicit = pair_metrics(beta * h_val, val['g'], val['prefs'], data['tau'])
    final = path.rows[-1]
    metrics = {'policy': policy, 'reference': policy, 'beta': beta, 'seed': seed,
               'eval_prompts': eval_prompts, 'steps': steps, 'seconds': round(time.time() - t_start, 1),
               'implicit_val_acc': implicit['val_acc'], 'implicit_gold_acc': implicit['gold_acc'],
               'eval': {'dpo': {**{k: final[k] for k in final if k not in ('method', 'n', 'step')},
                                'samples': path.samples}}, 'path': path.rows}
    save_checkpoint({'model': model.state_dict(), 'model_args': ref_checkpoint['model_args'],
                     'config': config, 'vocab': vocab, 'iter_num': steps,
                     'metrics': json.loads(json.dumps(metrics)),
                     'budget': epochs * P * K * (K - 1) // 2, 'made_from': made_from(*parents)},
                    os.path.join(out_dir, 'dpo.pt'))
    path.save(out_dir, metrics, ['dpo.json', f'dpo_beta{beta:g}.json'])  # and redraw the frontier
    print('-' * 72)
    print_rows(path.rows)
    print(f"implicit reward beta h on the held-out labelled pairs: val_acc {implicit['val_acc']:.4f}, "
          f"gold_acc {implicit['gold_acc']:.4f} (reward.json has the reward model's)")
    for i, s in enumerate(path.samples):
        print(f'--- held-out prompt {i}: {s!r}')
    print(f"seconds {metrics['seconds']}")
