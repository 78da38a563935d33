"""
reward.py: a Bradley-Terry reward model, learnt from the simulated labeler's choices. Step 2 of minibard.

The recipe (InstructGPT, Ouyang et al. 2022, section 3.5), the human replaced by labeler.py; the
reasons: docs/reward.md.
 1. Prompts: the `prompt_len` characters before a speech starts (held-out: the validation text).
    K whole-turn answers each from `policy` (sft.pt, as InstructGPT); the labeler chooses in all
    K(K-1)/2 pairs (here a label is free, an answer costs compute).
 2. r(x, y): model.RewardModel on the policy's trunk; it sees prompts, answers and choices, never the gold g.
 3. Loss: -log sigmoid(r(x, y_w) - r(x, y_l)) over the pairs of a prompt, its K answers in one
    batch (InstructGPT eq. 1); `epochs` passes, lr decaying linearly to 0.
 4. Early stopping on a dev set of training-text prompts, scored `evals` times.
 5. Normalisation: the policy's held-out answers score 0 on average, so
    sigmoid(r) = P(the labeler prefers this answer to a typical one of the policy).
 6. A reference learner: the same pairs and loss on bag-of-words features, L2 chosen on dev:
    beside the Bayes limit it tells a data limit from a learning gap.
 7. Measured on held-out prompts with fresh choices (labeler.pair_metrics), and repeat_gain: what
    saying one positive word 8 times instead of once adds, in RM stds (to gold: nothing).

Run:  python reward.py              (after python sft.py; times and numbers: README)
      python reward.py --seed=1     (other prompts, answers and choices; the same sft.pt)
      python reward.py --policy=gpt.pt   (the road without SFT: answers of the pretrained GPT)
Writes out/reward.pt, reward.json and preferences.pt (the labelled answers: what dpo.py trains on).
"""
import copy
import math
import os
import sys
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from configurator import ByDevice, configure
from data import (END_OF_TURN, answer_texts, encode, ends_turn, load_splits, sample_answers, sample_prompts,
                  turn_starts)
from labeler import all_pairs, gold_scores, label, pair_metrics, repeat_probe, words
from model import GPTConfig, RewardModel, load_gpt, rm_scores
from plumbing import (die, eta, made_from, prepare_out_dir, progress, refuse_to_replace, save_checkpoint,
                      share_done, write_json)

# ----------------------------------------------------------------------------------------
# hyperparameters (`--key=value` overrides any of them)
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', ...; sizes follow it
out_dir = 'out'                 # reads out_dir/<policy>, writes out_dir/reward.pt and reward.json
policy = 'sft.pt'               # a checkpoint of out_dir: whose answers are labelled; the RM starts from it
data_path = 'input.txt'
seed = 1337                     # in [0, inf): prompts, answers, labels and shuffles
prompt_len = 16                 # in [1, inf): the end of a speech and the next speaker's name
max_answer_len = 96             # in [2, inf): a turn ends at its blank line or this long
rm_context = 0                  # in [0, inf): prompt characters the RM reads (the labeler: none)
K = 32                          # in [2, inf): answers per prompt: 496 pairs (InstructGPT: 4..9)
train_prompts = ByDevice(cpu=625, cuda=1250)  # in [1, inf): CPU: 20,000 answers, 310,000 pairs
dev_prompts = 40                # in [1, inf): training-text prompts: early stopping, BoW's L2
val_prompts = 47                # in [1, inf): held-out prompts (validation text): 23,312 pairs
tau = 1.0                       # in (0, inf): labeler noise: P(i > j) = sigmoid((g_i - g_j) / tau)
temperature = 1.0               # in (0, inf): the policy's sampling temperature
gen_batch = 1024                # in [1, inf): sequences per generate() call
prompts_per_batch = 1           # in [1, inf): prompts per step: K answers, K(K-1)/2 pairs
learning_rate = 7e-4            # in (0, inf): AdamW, whole RM, linear decay to 0 (docs/log.md)
epochs = 3                      # in [1, inf): passes over the pairs (why 3: docs/log.md)
_bf16_units = getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)()  # private; absent: False
_bf16 = 'bfloat16' if _bf16_units else 'float32'  # the RM's faster CPU dtype
dtype = ByDevice(cpu=_bf16, cuda='float32')  # in {'bfloat16', 'float32'}: on CPU, bf16 autocast or not
evals = 2                       # in [1, inf): dev evaluations over the run; the best one is kept
grad_clip = 1.0                 # in (0, inf): global grad-norm clip (nanoGPT's name)
log_interval = 50               # in [1, inf)
allow_stale = False             # go on from a <policy> made from an older checkpoint than the one there now
# ----------------------------------------------------------------------------------------


def pairwise_loss(r, prefs):
    """Bradley-Terry loss. r: (P, K) RM scores; prefs: (P, K(K-1)/2), 1 where y_i beat y_j.

    loss = -1/C(K,2) sum_{pairs} log sigmoid(r_w - r_l), averaged over prompts (InstructGPT eq. 1).
    Returns (loss, accuracy: the share of pairs where r_w > r_l)."""
    i, j = all_pairs(r.size(1))
    d = r[:, i] - r[:, j]  # (P, pairs): r_i - r_j
    margin = torch.where(prefs > 0.5, d, -d)  # r_w - r_l
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


# ------------------------------------------------------------------ preference data, training, metrics
class Preferences(NamedTuple):
    """K answers to each of P prompts and the labels of all their pairs."""
    seqs: torch.Tensor     # (P, K, Tp + Ta) prompt and answer tokens, padded after each answer's end
    lengths: torch.Tensor  # (P, K) answer lengths
    g: torch.Tensor        # (P, K) gold scores (hidden from the RM)
    prefs: torch.Tensor    # (P, K(K-1)/2) 1 where y_i beat y_j (pairs of all_pairs)


def make_preferences(model, data, starts, n_prompts, k, prompt_len, max_len, stop, tau, temperature, vocab,
                     cpu_gen, sample_gen, gen_batch=1024, on_progress=None):
    """Prompts (speech starts of data), k answers each, their gold and sampled labels of all pairs
    -> Preferences. cpu_gen draws prompts and labels, sample_gen (on the model's device) answers."""
    device = next(model.parameters()).device
    prompts = sample_prompts(data, starts, n_prompts, prompt_len, cpu_gen).to(device)  # (P, Tp)
    rep = prompts.repeat_interleave(k, dim=0)  # (P k, Tp)
    y, lengths = sample_answers(model, rep, max_len, stop, temperature, sample_gen, gen_batch,
                                on_progress=on_progress)
    g = gold_scores(y.cpu(), lengths.cpu(), vocab).view(n_prompts, k)  # (P, k)
    i, j = all_pairs(k)
    prefs = label(g[:, i], g[:, j], tau, generator=cpu_gen)  # (P, k(k-1)/2)
    seqs = torch.cat([rep, y], 1).view(n_prompts, k, -1)  # (P, k, Tp + Ta)
    return Preferences(seqs.cpu(), lengths.view(n_prompts, k).cpu(), g, prefs)


@torch.no_grad()
def evaluate_rm(rm, data, prompt_len, tau):
    """rm on the Preferences `data`: pairwise loss, pair_metrics, the mean and std of its scores."""
    r = rm_scores(rm, data.seqs.flatten(0, 1), prompt_len, data.lengths.flatten()).view_as(data.g).cpu()
    return {'loss': pairwise_loss(r, data.prefs)[0].item(), **pair_metrics(r, data.g, data.prefs, tau),
            'mean_reward': r.mean().item(), 'std_reward': r.std().item()}


def train_reward_model(rm, train, dev, prompt_len, tau, lr, epochs, prompts_per_batch, evals, grad_clip,
                       generator, log=print, log_interval=50, dtype='float32'):
    """Fit rm to the Preferences `train`; `evals` times (the last at the end) score it on `dev` in
    fp32 and keep the state of lowest dev loss. Returns [(step, dev metrics)]; a NaN loss raises
    FloatingPointError."""
    P, k, T = train.seqs.shape
    device = next(rm.parameters()).device
    # answers a forward: on 2 fp32 CPU cores 8 stay in the cache; bf16 and GPUs win with bigger calls
    chunk = 8 if dtype == 'float32' and device.type == 'cpu' else 32
    opt = torch.optim.AdamW(rm.parameters(), lr=lr, weight_decay=0.0)
    steps = max(1, epochs * (P // prompts_per_batch))
    eval_at = {round(steps * (e + 1) / evals) for e in range(evals)}
    history, best, run_loss, t0 = [], (float('inf'), None), None, time.time()
    for step in range(steps + 1):
        if step in eval_at:  # early stopping on the dev pairs
            rm.eval()
            m = evaluate_rm(rm, dev, prompt_len, tau)
            rm.train()
            history.append((step, m))
            log(f"eval {step}: dev loss {m['loss']:.4f}, dev acc {m['val_acc']:.4f}, "
                f"dev gold_acc {m['gold_acc']:.4f}")
            if m['loss'] < best[0]:
                best = (m['loss'], copy.deepcopy(rm.state_dict()))
        if step == steps:
            break
        lr_now = lr * (1 - step / steps)  # linear decay to 0
        for group in opt.param_groups:
            group['lr'] = lr_now
        if step % (P // prompts_per_batch or 1) == 0:
            order = torch.randperm(P, generator=generator)  # a new shuffle each epoch
        b = order[(step % (P // prompts_per_batch or 1)) * prompts_per_batch:][:prompts_per_batch]
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
            r = rm_scores(rm, train.seqs[b].view(-1, T), prompt_len, train.lengths[b].flatten(), chunk)
        loss, acc = pairwise_loss(r.view(len(b), k), train.prefs[b].to(device))
        lossf = loss.item()
        if not math.isfinite(lossf):
            raise FloatingPointError(f'reward model loss is {lossf} at step {step}')
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), grad_clip)
        opt.step()
        run_loss = lossf if run_loss is None else 0.95 * run_loss + 0.05 * lossf
        if step % log_interval == 0:
            log(f'iter {share_done(step, steps)}: loss {run_loss:.4f}, acc {acc.item():.3f}, '
                f'lr {lr_now:.2e}, {eta(step, steps, t0)}')
    rm.load_state_dict(best[1])
    rm.eval()
    return history


# ------------------------------------------------------------------ the reference learner
def bow_features(texts, index):
    """Word presence as EmbeddingBag input: ids (sum of words per text,), offsets (N,). A word of
    `index` counts once per text, as the labeler counts it."""
    ids, offsets = [], []
    for t in texts:
        offsets.append(len(ids))
        ids.extend(sorted({index[w] for w in words(t) if w in index}))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


def bow_scores(theta, features):
    """r(y) = sum over the distinct known words w of y of theta_w: (V,) weights -> (N,)."""
    ids, offsets = features
    return F.embedding_bag(ids, theta[:, None], offsets, mode='sum').squeeze(1)


def fit_bow(features, prefs, n_words, l2):
    """The Bradley-Terry loss on word presence plus l2 ||theta||^2, minimised by full-batch L-BFGS
    (convex: it finds the optimum). prefs (P, K(K-1)/2)."""
    theta = torch.zeros(n_words, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=500, history_size=20, line_search_fn='strong_wolfe')
    k = int(round((1 + math.sqrt(1 + 8 * prefs.size(1))) / 2))  # K from K(K-1)/2

    def closure():
        opt.zero_grad()
        loss = pairwise_loss(bow_scores(theta, features).view(-1, k), prefs)[0] + l2 * theta.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return theta.detach()


def bow_reference(texts, sets, tau, l2_grid=(1e-4, 3e-4, 1e-3, 3e-3)):
    """The learner fitted on texts['train'] with the l2 of the grid of lowest dev loss: its metrics
    on val. texts: name -> answers (list of str), sets: name -> Preferences."""
    index = {w: n for n, w in enumerate(sorted({w for t in texts['train'] for w in words(t)}))}
    feats = {name: bow_features(texts[name], index) for name in texts}
    best = None
    for l2 in l2_grid:
        theta = fit_bow(feats['train'], sets['train'].prefs, len(index), l2)
        r = {name: bow_scores(theta, feats[name]).view_as(sets[name].g) for name in ('dev', 'val')}
        dev_loss = pairwise_loss(r['dev'], sets['dev'].prefs)[0].item()
        if best is None or dev_loss < best[0]:
            best = (dev_loss, l2, pair_metrics(r['val'], sets['val'].g, sets['val'].prefs, tau))
    return {'bow_val_acc': best[2]['val_acc'], 'bow_gold_acc': best[2]['gold_acc'], 'bow_l2': best[1],
            'bow_words': len(index)}


def print_report(m, n_prompts, k, reps, n_rep):
    """The final block: the Bayes limit, the reference learner and the RM side by side."""
    print('-' * 72 + f"\nheld-out pairs {m['pairs_val']} ({n_prompts} prompts of the validation text x "
          f"{k * (k - 1) // 2})\n{'':22}{'val_acc':>8}{'gold_acc':>10}")
    rows = [('Bayes limit', m['bayes_acc'], '1', 'the best any model can agree with these labels'),
            ('bag of words', m['bow_val_acc'], f"{m['bow_gold_acc']:.4f}", 'a simple learner, same pairs'),
            ('reward model', m['val_acc'], f"{m['gold_acc']:.4f}",
             f"what the RM extracted (best dev loss at step {m['best_step']})")]
    for name, acc, gold, why in rows:
        print(f'{name:22}{acc:8.4f}{gold:>10}   {why}')
    print(f"ece {m['ece']:.4f} (calibration of sigmoid(r_i - r_j), 10 bins), prob_mae {m['prob_mae']:.4f}")
    if m['repeat_gain'] is not None:
        print("repetition: one positive word said 1/2/4/8 times -> mean score "
              + ' / '.join(f'{r:+.2f}' for r in reps.values()) + f" ({n_rep} answers); "
              f"repeat_gain {m['repeat_gain']:+.2f} RM std (gold: +0)")
    print(f"seconds {m['seconds']:.1f}")


if __name__ == '__main__':
    config = configure(globals(), sys.argv[1:])  # each option against its rule, then:
    if prompts_per_batch > train_prompts:
        die(f'--prompts_per_batch={prompts_per_batch} is more than --train_prompts={train_prompts}')
    if dtype == 'bfloat16' and device != 'cpu':
        die(f"--dtype=bfloat16 is CPU bf16 autocast; on --device={device!r} the RM trains in fp32: drop it")
    t_start = time.time()
    prepare_out_dir(out_dir, 'reward')
    budget = epochs * train_prompts * K * (K - 1) // 2  # labelled pairs the RM trains on
    rm_path = os.path.join(out_dir, 'reward.pt')
    refuse_to_replace(rm_path, budget, 'labelled pairs')
    torch.manual_seed(seed)
    policy_path = os.path.join(out_dir, policy)
    model, vocab, _ = load_gpt(policy_path, device=device, stale_ok=allow_stale)
    if prompt_len + max_answer_len > model.config.block_size:
        die(f'prompt_len + max_answer_len = {prompt_len + max_answer_len} exceeds the GPT block_size '
            f'{model.config.block_size}: lower them')
    train_data, val_data, _ = load_splits(data_path, vocab)
    stop = encode(END_OF_TURN, vocab)
    cpu_gen = torch.Generator().manual_seed(seed)  # prompts, labels, shuffles
    gen = torch.Generator(device).manual_seed(seed)  # answers
    print(f'sampling {K} answers of {policy} to {train_prompts} train + {dev_prompts} dev + '
          f'{val_prompts} val prompts')
    advance = progress('answers', K * (train_prompts + dev_prompts + val_prompts), 4 * gen_batch)
    train_starts, val_starts = (turn_starts(d, vocab, prompt_len) for d in (train_data, val_data))
    sets = {name: make_preferences(model, data, starts, n, K, prompt_len, max_answer_len, stop, tau,
                                   temperature, vocab, cpu_gen, gen, gen_batch, advance)
            for name, data, starts, n in [('train', train_data, train_starts, train_prompts),
                                          ('dev', train_data, train_starts, dev_prompts),
                                          ('val', val_data, val_starts, val_prompts)]}
    answers = {name: (s.seqs.flatten(0, 1)[:, prompt_len:], s.lengths.flatten())
               for name, s in sets.items()}  # (P K, Ta), (P K,)
    train = sets['train']
    print(f"{time.time() - t_start:.1f}s: {train.prefs.numel()} train, {sets['dev'].prefs.numel()} dev, "
          f"{sets['val'].prefs.numel()} val pairs; answers: {train.lengths.float().mean():.0f} "
          f"characters on average, {ends_turn(*answers['train'], stop).float().mean():.0%} end on their own; "
          f"gold mean {train.g.mean():.2f}, share non-zero {(train.g != 0).float().mean():.2f}")

    # the reference learner on the same pairs
    texts = {name: answer_texts(*answers[name], vocab) for name in sets}
    bow = bow_reference(texts, sets, tau)
    print(f"{time.time() - t_start:.1f}s: bag of words ({bow['bow_words']} words, l2 {bow['bow_l2']}): "
          f"val_acc {bow['bow_val_acc']:.4f}, gold_acc {bow['bow_gold_acc']:.4f}")

    # the reward model: the policy's trunk + a fresh head, dropout off
    args = dict(model.config.__dict__, dropout=0.0)
    rm = RewardModel(GPTConfig(**args), rm_context).to(device)
    rm.trunk.load_state_dict(model.state_dict())
    del model
    try:
        history = train_reward_model(rm, train, sets['dev'], prompt_len, tau, learning_rate, epochs,
                                     prompts_per_batch, evals, grad_clip, cpu_gen,
                                     log_interval=log_interval, dtype=dtype)
    except FloatingPointError as e:
        die(f'{e}: stopped; {out_dir}/reward.pt was not overwritten. Try a lower --learning_rate')
    best_step = min(history, key=lambda h: h[1]['loss'])[0]
    metrics = evaluate_rm(rm, sets['val'], prompt_len, tau)
    norm_bias, _ = metrics.pop('mean_reward'), metrics.pop('loss')  # held-out answers -> mean 0
    with torch.no_grad():
        rm.bias -= norm_bias
    score = torch.no_grad()(lambda seqs, n: rm_scores(rm, seqs, prompt_len, n))
    reps, n_rep = repeat_probe(score, sets['val'].seqs.flatten(0, 1)[:, :prompt_len], texts['val'], vocab,
                               rm.trunk.config.block_size - rm.context)
    gain = (reps[8] - reps[1]) / metrics['std_reward'] if n_rep and metrics['std_reward'] > 0 else None
    metrics = {'policy': policy, 'pairs_train': train.prefs.numel(), 'pairs_val': metrics.pop('pairs'),
               **metrics, **bow, 'answer_len': sets['val'].lengths.float().mean().item(),
               'ended': ends_turn(*answers['val'], stop).float().mean().item(), 'best_step': best_step,
               'repeat_rewards': {str(n): round(r, 4) for n, r in reps.items()}, 'repeat_gain': gain,
               'norm_bias': norm_bias, 'seconds': round(time.time() - t_start, 1)}
    # the labelled answers (dpo.py's data), then the RM: written together, after a training that may stop
    labelled = {name: {**s._asdict(), 'seqs': s.seqs.to(torch.uint8)} for name, s in sets.items()}
    save_checkpoint({'policy': policy, 'vocab': vocab, 'prompt_len': prompt_len, 'seed': seed, 'tau': tau,
                     'max_answer_len': max_answer_len, 'made_from': made_from(policy_path), **labelled},
                    os.path.join(out_dir, 'preferences.pt'))  # for dpo.py, which never reads g
    save_checkpoint({'model': rm.state_dict(), 'model_args': args, 'config': config, 'vocab': vocab,
                     'norm_bias': norm_bias, 'prompt_len': prompt_len, 'max_answer_len': max_answer_len,
                     'rm_context': rm_context, 'policy': policy, 'metrics': metrics, 'budget': budget,
                     'made_from': made_from(policy_path)}, rm_path)
    write_json({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
               os.path.join(out_dir, 'reward.json'))
    print_report(metrics, val_prompts, K, reps, n_rep)
