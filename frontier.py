"""
frontier.py: the ruler. Gold against exact KL to the reference (the policy a step starts from), for
any policy and for best-of-n, on held-out prompts (Gao et al. 2022); the table, csv and picture of
every run. What it measures is passed in: it imports no step. Gold is only measured, never used.

Run:  python frontier.py    (after ppo.py, and any of ppo.py --advantage=rloo / grpo and dpo.py)
Writes out/frontier.csv (a row per point, column method) and out/frontier.png: every run in
out_dir on one frontier (each step redraws it).
"""
import csv
import glob
import math
import os
import sys

import torch

from configurator import configure
from data import (answer_mask, answer_texts, decode, ends_turn, forward_in_chunks, sample_answers,
                  sample_prompts, turn_starts)
from labeler import all_pairs, gold_scores, label, pair_metrics, repeats_a_word
from model import answer_logits, exact_kl, rm_scores, token_logprobs
from plumbing import cached, die, digest, progress, read_json, write_json

# ----------------------------------------------------------------------------------------
# hyperparameters (`--key=value` overrides any of them)
out_dir = 'out'                 # reads the runs' json files there, writes frontier.csv and .png
# ----------------------------------------------------------------------------------------
FIELDS = ['method', 'n', 'step', 'gold', 'gold_se', 'rm', 'rm_se', 'prob', 'kl', 'length', 'ended',  # a row
          'repeats', 'logp_ref']  # (older rows lack these two)
NOT_RUNS = {'gpt', 'sft', 'reward', 'best_of_n', 'eval', 'dpo', 'chat_check'}  # out_dir's other json files


# ------------------------------------------------------------------ a policy on held-out prompts
def held_out_prompts(val_data, vocab, n, prompt_len, seed, device):
    """The evaluation prompts: n speech starts of the validation text, the same for a seed everywhere."""
    starts = turn_starts(val_data, vocab, prompt_len)
    return sample_prompts(val_data, starts, n, prompt_len, torch.Generator().manual_seed(seed + 1)).to(device)


def answer_values(answers, lengths, vocab, stop):
    """Each answer's (N, Ta) gold, length, ended, and whether it says a word twice in a row (the blind
    spot of a summed RM that an over-optimised policy finds)."""
    answers, lengths = answers.cpu(), lengths.cpu()
    return {'gold': gold_scores(answers, lengths, vocab), 'length': lengths.float(),
            'ended': ends_turn(answers, lengths, stop).float(),
            'repeats': torch.tensor([1.0 * repeats_a_word(t) for t in answer_texts(answers, lengths, vocab)])}


def logp_per_char(model, seqs, lengths, prompt_len):
    """log pi(y) / |y| of each answer under `model` at temperature 1 (nats per character): under the
    reference, how far from the bard's speech an answer is. seqs (b, Tp + Ta), lengths (b,) -> (b,)."""
    logp = token_logprobs(answer_logits(model(seqs)[0], prompt_len), seqs[:, prompt_len:])  # (b, Ta)
    return (logp * answer_mask(lengths, logp.size(1))).sum(1) / lengths


@torch.no_grad()
def measure_policy(policy, ref, prompts, vocab, max_len, stop, temperature, n_samples, seed, chunk=32,
                   batch=256, log=None):
    """n_samples answers of `policy` to each prompt (P, Tp), each with its answer_values, exact KL(pi ||
    pi_ref) summed over it (nats) and log pi_ref per character. -> (seqs, lengths, {name: (P n,)})."""
    gen = torch.Generator(prompts.device).manual_seed(seed)
    Tp = prompts.size(1)
    rep = prompts.repeat_interleave(n_samples, 0)  # (P n, Tp)
    advance = progress('answers', len(rep), 8 * batch, log) if log else None
    y, lengths = sample_answers(policy, rep, max_len, stop, temperature, gen, batch, on_progress=advance)
    seqs = torch.cat([rep, y], 1)
    kl = lambda s, n: (exact_kl(answer_logits(policy(s)[0], Tp), answer_logits(ref(s)[0], Tp), temperature)
                       * answer_mask(n, s.size(1) - Tp)).sum(1)  # (b,) nats per answer
    kl, logp_ref = forward_in_chunks(lambda s, n: (kl(s, n), logp_per_char(ref, s, n, Tp)), seqs, lengths, Tp,
                                     chunk)
    return seqs, lengths, {**answer_values(y, lengths, vocab, stop),
                           'kl': kl.cpu(), 'logp_ref': logp_ref.cpu()}


def mean_se(x):
    """(mean, standard error of the mean) of a 1-D tensor of per-prompt values."""
    return x.mean().item(), (x.std() / math.sqrt(len(x))).item() if len(x) > 1 else 0.0


def frontier_row(name, per_prompt, kl, n=None, step=None):
    """One row of the frontier: rm and gold (means and standard errors over prompts), the means of
    the rest, a KL in nats; n for a point of best-of-n, step for a point of a run."""
    (rm, rm_se), (gold, gold_se) = mean_se(per_prompt['rm']), mean_se(per_prompt['gold'])
    return {'method': name, 'n': n, 'step': step, 'gold': gold, 'gold_se': gold_se, 'rm': rm,
            'rm_se': rm_se, 'prob': torch.sigmoid(per_prompt['rm'].float()).mean().item(), 'kl': kl,
            **{k: per_prompt[k].mean().item() for k in FIELDS[9:]}}


@torch.no_grad()
def policy_point(policy, ref, rm, prompts, vocab, max_len, stop, temperature, n_samples, seed, it,
                 chunk=32, method='ppo'):
    """The policy on held-out prompts (P, Tp), n_samples answers each (measure_policy) and their RM
    scores: -> (its frontier row, three sample answers)."""
    P, Tp = prompts.shape
    seqs, lengths, per_answer = measure_policy(policy, ref, prompts, vocab, max_len, stop, temperature,
                                               n_samples, seed, chunk)
    per_answer['rm'] = rm_scores(rm, seqs, Tp, lengths, chunk).cpu()
    kl = per_answer.pop('kl').mean().item()
    per_prompt = {k: v.view(P, n_samples).mean(1) for k, v in per_answer.items()}
    first = slice(None, 3 * n_samples, n_samples)  # the first answer to each of 3 prompts
    row = frontier_row(method, per_prompt, kl, step=it)
    return row, answer_texts(seqs[first, Tp:], lengths[first], vocab)


def eval_line(step, row):
    """The log line of one evaluated point of a run."""
    return (f"eval {step}: gold {row['gold']:.3f} ± {row['gold_se']:.3f}, rm {row['rm']:.3f}, "
            f"kl {row['kl']:.2f}, length {row['length']:.0f}, ended {row['ended']:.2f}, "
            f"repeats {row['repeats']:.2f}, logp_ref {row['logp_ref']:.2f}")


# ------------------------------------------------------------------ best-of-n
@torch.no_grad()
def best_of_n(model, rm, prompts, n, max_len, stop, temperature, generator, batch=1024, top_k=None,
              on_progress=None, chunk=32):
    """Best-of-n reranking: n answers per prompt (P, Tp), the RM's favourite kept. -> the best answers
    (P, Ta), their lengths and RM scores (P,), and all answers (P, n, Ta), lengths and scores (P, n)."""
    P, Tp = prompts.shape
    rep = prompts.repeat_interleave(n, 0)  # (P n, Tp)
    y, lengths = sample_answers(model, rep, max_len, stop, temperature, generator, batch, top_k,
                               on_progress)
    r = rm_scores(rm, torch.cat([rep, y], 1), Tp, lengths, chunk).view(P, n)  # (P, n)
    best, idx = r.argmax(1), torch.arange(P)
    y, lengths = y.view(P, n, -1), lengths.view(P, n)
    return y[idx, best], lengths[idx, best], r[idx, best], y, lengths, r


def best_of_n_weights(N, n):
    """w_i = P(the best of n samples drawn without replacement from N is the i-th lowest-ranked)
    = C(i-1, n-1) / C(N, n), i = 1..N: the unbiased best-of-n estimator over order statistics
    (Nakano et al. 2021, appendix; Gao et al. 2022). (N,) float64, summing to 1."""
    return torch.tensor([math.comb(i - 1, n - 1) / math.comb(N, n) for i in range(1, N + 1)],
                        dtype=torch.float64)


def best_of_n_curve(scores, values, ns):
    """Expected values of best-of-n per prompt from N samples a prompt, ranked by RM scores (P, N);
    values: name -> (P, N) (gold, length, ...). -> {n: {'rm': (P,), name: (P,), ...}}, n in ns <= N."""
    order = scores.argsort(1)  # rank samples by the RM, lowest first
    ranked = {'rm': scores, **values}
    ranked = {k: v.gather(1, order).double() for k, v in ranked.items()}
    return {n: {k: v @ best_of_n_weights(scores.size(1), n) for k, v in ranked.items()} for n in ns}


@torch.no_grad()
def best_of_n_frontier(ref, rm, prompts, vocab, max_len, stop, temperature, n_max, seed, batch=256,
                       chunk=32, log=None):
    """Best-of-n over `ref` for n = 1, 2, 4, ..., n_max on held-out prompts (P, Tp), from one pass of
    n_max answers a prompt, at the KL bound log n - (n-1)/n (n = 1: the reference itself).
    -> (rows, three sample answers: plain and best-of-16). Progress lines to log."""
    gen = torch.Generator(prompts.device).manual_seed(seed)
    P = prompts.size(0)
    advance = progress('best-of-n answers', P * n_max, 16 * batch, log) if log else None
    *_, y, lengths, r = best_of_n(ref, rm, prompts, n_max, max_len, stop, temperature, gen, batch,
                                  on_progress=advance, chunk=chunk)  # (P, N, Ta), (P, N), (P, N)
    y, lengths, Tp = y.flatten(0, 1), lengths.flatten(), prompts.size(1)  # (P N, Ta), (P N,)
    seqs = torch.cat([prompts.repeat_interleave(n_max, 0), y], 1)  # (P N, Tp + Ta)
    logp_ref = forward_in_chunks(lambda s, n: logp_per_char(ref, s, n, Tp), seqs, lengths, Tp, chunk)
    values = {**answer_values(y, lengths, vocab, stop), 'logp_ref': logp_ref.cpu()}
    ns = [2 ** k for k in range(int(math.log2(n_max)) + 1)]
    curve = best_of_n_curve(r.cpu(), {k: v.view(P, n_max) for k, v in values.items()}, ns)
    rows = [frontier_row('best_of_n', curve[n], math.log(n) - (n - 1) / n, n=n) for n in ns]
    first3 = torch.arange(min(3, P)) * n_max  # the first sample to each of 3 prompts, and their best of 16
    best16 = first3 + r[:len(first3), :16].argmax(1).cpu()
    samples = {'reference': answer_texts(y[first3], lengths[first3], vocab),
               'best_of_16': answer_texts(y[best16], lengths[best16], vocab)}
    return rows, samples


def best_of_n_kept(out_dir, reference, ref, rm, prompts, vocab, max_len, stop, temperature, n_max, seed,
                   chunk=32, log=print):
    """best_of_n_frontier(), kept in out_dir/best_of_n.json under the digests of all it depends on:
    every run of a seed reads back the curve the first measured (one of another shape: measured again)."""
    key = {'reference': digest(os.path.join(out_dir, reference)), 'prompts': digest(prompts), 'seed': seed,
           'reward': digest(os.path.join(out_dir, 'reward.pt')), 'max_answer_len': max_len,
           'temperature': temperature, 'best_of_max': n_max, 'device': prompts.device.type}
    valid = lambda kept: all(is_row(r) and 'logp_ref' in r for r in kept[0]) and len(kept[1]) == 2
    measure = lambda: best_of_n_frontier(ref, rm, prompts, vocab, max_len, stop, temperature, n_max, seed,
                                         chunk=chunk, log=log)
    return cached(os.path.join(out_dir, 'best_of_n.json'), key, measure, valid, log=log)


@torch.no_grad()
def rm_calibration(policy, rm, prompts, vocab, max_len, stop, temperature, k, seed, tau, chunk=32):
    """How far the RM's P = sigmoid(r_i - r_j) holds on a policy's own answers: k to each prompt (P,
    Tp), every pair labelled as for reward.py; pair_metrics: ece, prob_mae, gold_acc, val_acc."""
    gen = torch.Generator(prompts.device).manual_seed(seed)
    *_, y, lengths, r = best_of_n(policy, rm, prompts, k, max_len, stop, temperature, gen, chunk=chunk)
    g = gold_scores(y.flatten(0, 1).cpu(), lengths.flatten().cpu(), vocab).view(len(prompts), k)  # (P, k)
    i, j = all_pairs(k)
    m = pair_metrics(r.cpu(), g, label(g[:, i], g[:, j], tau, torch.Generator().manual_seed(seed)), tau)
    return {key: round(m[key], 4) for key in ('ece', 'prob_mae', 'gold_acc', 'val_acc', 'bayes_acc')}


# ------------------------------------------------------------------ a run's path; every run's frontier
class RunPath:
    """A run's points, as every step records them: add(step) measures the policy (policy_point), keeps
    the row (with `extra` columns: DPO's beta) and samples; save() writes the run's json file(s), then
    redraws out_dir's frontier from every run."""
    def __init__(self, method, policy, ref, rm, prompts, vocab, max_len, stop, temperature, n_samples, seed,
                 chunk=32, **extra):
        self.measure = lambda step: policy_point(policy, ref, rm, prompts, vocab, max_len, stop, temperature,
                                                 n_samples, seed, step, chunk, method)
        self.rows, self.samples, self.extra = [], [], extra

    def add(self, step):
        row, self.samples = self.measure(step)
        self.rows.append({**row, **self.extra})
        print(eval_line(step, row))
        return row

    def save(self, out_dir, metrics, names):
        for name in names:
            write_json(metrics, os.path.join(out_dir, name))
        rows, reference = collect(out_dir, names[0][:-5])  # this run's seed and reference decide
        if rows:
            save_frontier(rows, out_dir, reference)


def gold_at_kl(curve, kl):
    """The best-of-n curve's gold at a KL, linear between its points (past its last: extrapolated
    from the last two, and flagged). curve: rows sorted by KL."""
    k = next((k for k in range(1, len(curve)) if kl <= curve[k]['kl']), len(curve) - 1)
    a, b = curve[k - 1], curve[k]
    return a['gold'] + (b['gold'] - a['gold']) * (kl - a['kl']) / (b['kl'] - a['kl']), kl > curve[-1]['kl']


def eval_result(curve, ppo_row, samples, ppo_samples, prompts, vocab):
    """A run's eval block: the reference, best_of_16 and the policy (each its numbers and samples),
    the best-of-n curve and its gold at the policy's KL, the sample prompts."""
    by_n = {row['n']: row for row in curve}
    keep = lambda row, s: {**{k: row.get(k, math.nan) for k in FIELDS[3:]}, 'samples': s}
    same_kl, extrapolated = gold_at_kl(curve, ppo_row['kl'])
    return {'reference': keep(by_n[1], samples['reference']),
            'best_of_16': keep(by_n[16], samples['best_of_16']),
            ppo_row['method']: keep(ppo_row, ppo_samples), 'best_of_n': curve,
            'best_of_n_at_ppo_kl': {'gold': same_kl, 'extrapolated': extrapolated},
            'prompts': [decode(p, vocab) for p in prompts[:3]]}


def print_frontier(curve, path, result):
    """The table of best-of-n and the run's path, how the run compares, and the sample answers."""
    print_rows(curve + path)
    method = path[-1]['method']
    ref, bo16, ppo = result['reference'], result['best_of_16'], result[method]
    same, name = result['best_of_n_at_ppo_kl'], method.upper()
    print(f"gold gained over the reference: {name} {ppo['gold'] - ref['gold']:+.3f} at KL {ppo['kl']:.2f}, "
          f"best-of-16 {bo16['gold'] - ref['gold']:+.3f} at KL <= {bo16['kl']:.2f}")
    print(f"best-of-n at {name}'s KL: gold {same['gold']:.3f}" + (' (extrapolated past n = '
          f"{curve[-1]['n']})" if same['extrapolated'] else '') + f", {name} {ppo['gold']:.3f}")
    for i, p in enumerate(result['prompts']):
        print(f'\n--- prompt {i}: {p!r}')
        for who in ('reference', 'best_of_16', method):
            print(f"{who:>12}: {result[who]['samples'][i]!r}")


def is_row(row):
    """A frontier row as a run writes it: a method, n and step whole or None, every column a number."""
    return (isinstance(row, dict) and isinstance(row.get('method'), str)
            and all(type(row.get(k)) in (int, type(None)) for k in FIELDS[1:3])
            and all(type(row.get(k)) in (int, float) for k in FIELDS[3:11])
            and all(type(row.get(k, 0.0)) in (int, float) for k in FIELDS[11:] + ['beta']))


def is_run(run):
    """A run's json as the steps write it: its path and eval block, every row readable."""
    rows = run['path'] + run['eval'].get('best_of_n', [])
    return len(run['path']) > 0 and all(map(is_row, rows)) and type(run.get('beta', 0.0)) in (int, float)


def collect(out_dir, anchor=None):
    """The frontier rows of out_dir: best-of-n (from the first run that measured it), the reference as
    'sft' when it is the SFT model, the path of every run. A run of another seed or reference, and a
    damaged json, are left out with a note (the first run: `anchor`'s, if given).
    -> (rows, the reference); no best-of-n curve: ([], None)."""
    names = sorted(os.path.basename(f)[:-5] for f in glob.glob(os.path.join(out_dir, '*.json')))
    runs = {name: read_json(os.path.join(out_dir, f'{name}.json'), is_run, "a run's results")
            for name in names if name not in NOT_RUNS}
    runs = {name: run for name, run in runs.items() if run is not None}
    same = lambda run: tuple(run.get(k) for k in ('reference', 'seed', 'eval_prompts'))
    first = runs.get(anchor) or next((run for run in runs.values() if 'best_of_n' in run['eval']), None)
    curves = [r for r in runs.values() if first and 'best_of_n' in r['eval'] and same(r) == same(first)]
    first = curves[0] if curves else None
    if first is None:
        return [], None
    curve, reference = first['eval']['best_of_n'], first.get('reference', 'gpt.pt')
    rows = [dict(r) for r in curve]
    if reference == 'sft.pt':
        rows.append({**curve[0], 'method': 'sft', 'n': None, 'step': 0})
    for name, run in runs.items():
        if same(run) != same(first):
            print(f'note: {name}.json has another reference, seed or eval_prompts than the first run: '
                  'left out', file=sys.stderr)
            continue
        rows += [{**r, 'beta': run.get('beta', '')} for r in run['path']]
    return rows, reference


def save_frontier(rows, out_dir, reference='the reference'):
    """out/frontier.csv (a row per point), and with matplotlib out/frontier.png: gold, RM score and the
    answers' log pi_ref per character against KL, a line per run (DPO: per beta; gold as the reward:
    dashed). Each file is written whole or not at all."""
    tmp = os.path.join(out_dir, f'frontier.tmp{os.getpid()}')
    with open(tmp, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=FIELDS + ['beta'], extrasaction='ignore')
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, os.path.join(out_dir, 'frontier.csv'))
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return
    lines = {}
    for r in rows:
        name = {'best_of_n': 'best-of-n (KL bound)', 'sft': 'SFT'}.get(r['method'], r['method'].upper())
        beta = f" β {r['beta']:g}" if r.get('beta', '') != '' else ''
        name = name.replace('_GOLD', ' (gold as reward)').replace('_BETA', ', β ')  # e.g. grpo_gold_beta0
        lines.setdefault(name + beta, []).append(r)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, key in zip(axes, ('gold', 'rm', 'logp_ref')):
        for name, pts in lines.items():
            style = 'o-' if name.startswith('best') else '*' if name == 'SFT' else '.-'
            ax.errorbar([r['kl'] for r in pts], [r.get(key, math.nan) for r in pts], label=name, capsize=2,
                        fmt=style + '-' * ('gold' in name), yerr=[r.get(key + '_se', 0) for r in pts],
                        markersize=12 if name == 'SFT' else 6)
        ax.set_xlabel(f'KL to {reference} (nats)')
        ax.set_ylabel({'gold': 'gold score (hidden)', 'rm': 'reward model score',
                       'logp_ref': f'log-likelihood a character under {reference}'}[key])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(tmp + '.png')
    os.replace(tmp + '.png', os.path.join(out_dir, 'frontier.png'))
    plt.close(fig)


def print_rows(rows):
    """The gold-vs-KL table of frontier rows."""
    w = max([10] + [len(row['method']) for row in rows])  # the method column's width
    print(f"{'method':<{w}} {'n':>3} {'step':>5} {'gold':>7} {'± se':>6} {'rm':>7} {'prob':>6} {'kl':>7} "
          f"{'length':>6} {'ended':>5} {'repeats':>7} {'logp_ref':>8}")
    for row in rows:
        bound = '<=' if row['method'] == 'best_of_n' and row['n'] > 1 else '  '
        beta = f" β {row['beta']:g}" if row.get('beta', '') != '' else ''
        n, step = ('' if row[k] is None else row[k] for k in ('n', 'step'))
        repeats, logp_ref = (row.get(k, math.nan) for k in FIELDS[11:])  # (nan in older rows)
        print(f"{row['method']:<{w}} {n:>3} {step:>5} {row['gold']:7.3f} {row['gold_se']:6.3f} "
              f"{row['rm']:7.3f} {row['prob']:6.3f} {bound}{row['kl']:5.2f} {row['length']:6.1f} "
              f"{row['ended']:5.2f} {repeats:7.2f} {logp_ref:8.3f}{beta}")


if __name__ == '__main__':
    config = configure(globals(), sys.argv[1:])
    rows, reference = collect(out_dir)
    if not rows:
        die(f'no run of ppo.py in {out_dir} (the best-of-n curve comes with it): run python ppo.py first')
    save_frontier(rows, out_dir, reference)
    print_rows(rows)
    print(f'written: {out_dir}/frontier.csv' + (' and frontier.png' if os.path.exists(
          os.path.join(out_dir, 'frontier.png')) else ' (pip install matplotlib for frontier.png)'))
