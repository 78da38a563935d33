"""
frontier.py: the ruler. Gold against KL to the reference policy (Gao et al. 2022), for any policy
and for best-of-n, on held-out prompts of the validation text; the table, csv and picture.

The reference is the policy a step starts from (the SFT model on InstructGPT's road, the
pretrained GPT on the road without SFT). What is measured is passed in (policy, reference,
reward model): this file imports no step. Gold is only ever measured, never used to pick.
 - a policy: answers sampled from it, and the exact KL to the reference summed over each answer,
   from the full next-character distributions (65 characters: exact is cheap; measure_policy).
 - best-of-n: n answers of the reference per prompt, the RM's favourite kept. Its expected gold
   for every n <= N comes from one pass of N answers per prompt, by the unbiased estimator over
   their order statistics (Nakano et al. 2021, appendix); its KL is the bound log n - (n-1)/n.

Run:  python frontier.py    (after ppo.py, and any of ppo.py --advantage=rloo / grpo and dpo.py)
Writes out/frontier.csv (a row per point, column method: best_of_n, sft, ppo, rloo, grpo, dpo)
and out/frontier.png: every run found in out_dir, on one frontier; ppo.py and dpo.py redraw it.
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
          'repeats', 'logp_ref']  # (the last two: since 2026-12-04; older rows lack them)
NOT_RUNS = {'gpt', 'sft', 'reward', 'best_of_n', 'eval', 'dpo', 'chat_check'}  # out_dir's other json files


# ------------------------------------------------------------------ a policy on held-out prompts
def held_out_prompts(val_data, vocab, n, prompt_len, seed, device):
    """The evaluation prompts: n speech starts of the validation text, the same for every step and
    sample.py at the same seed."""
    starts = turn_starts(val_data, vocab, prompt_len)
    return sample_prompts(val_data, starts, n, prompt_len, torch.Generator().manual_seed(seed + 1)).to(device)


def answer_values(answers, lengths, vocab, stop):
    """What is measured of each answer (N, Ta) besides its reward: gold, length, ended, and whether it
    says a word twice in a row (the blind spot of a summed RM that an over-optimised policy finds)."""
    answers, lengths = answers.cpu(), lengths.cpu()
    return {'gold': gold_scores(answers, lengths, vocab), 'length': lengths.float(),
            'ended': ends_turn(answers, lengths, stop).float(),
            'repeats': torch.tensor([float(repeats_a_word(t)) for t in answer_texts(answers, lengths, vocab)])}


def logp_per_char(model, seqs, lengths, prompt_len):
    """log pi(y) / |y| of each answer under `model` at temperature 1: how far from the bard's speech
    an answer is, for the reference (nats per character). seqs (b, Tp + Ta), lengths (b,) -> (b,)."""
    logp = token_logprobs(answer_logits(model(seqs)[0], prompt_len), seqs[:, prompt_len:])  # (b, Ta)
    return (logp * answer_mask(lengths, logp.size(1))).sum(1) / lengths


@torch.no_grad()
def measure_policy(policy, ref, prompts, vocab, max_len, stop, temperature, n_samples, seed, chunk=32,
                   batch=256, log=None):
    """n_samples answers of `policy` to each held-out prompt (P, Tp), sampled `batch` at a time
    (log, if given, gets a progress line every 8 batches), and per answer its gold, length, ended,
    repeats, exact KL(pi || pi_ref) summed over its characters (nats) and log pi_ref per character,
    forwarded `chunk` at a time. -> (seqs (P n, Tp + Ta), lengths (P n,), {name: (P n,)})."""
    gen = torch.Generator(prompts.device).manual_seed(seed)
    Tp = prompts.size(1)
    rep = prompts.repeat_interleave(n_samples, 0)  # (P n, Tp)
    advance = progress('answers', len(rep), 8 * batch, log) if log else None
    y, lengths = sample_answers(policy, rep, max_len, stop, temperature, gen, batch, on_progress=advance)
    seqs = torch.cat([rep, y], 1)
    kl = lambda s, n: ((exact_kl(answer_logits(policy(s)[0], Tp), answer_logits(ref(s)[0], Tp), temperature)
                        * answer_mask(n, s.size(1) - Tp)).sum(1), logp_per_char(ref, s, n, Tp))  # (b,) each
    kl, logp_ref = forward_in_chunks(kl, seqs, lengths, Tp, chunk)
    return seqs, lengths, {**answer_values(y, lengths, vocab, stop), 'kl': kl.cpu(), 'logp_ref': logp_ref.cpu()}


def mean_se(x):
    """(mean, standard error of the mean) of a 1-D tensor of per-prompt values."""
    return x.mean().item(), (x.std() / math.sqrt(len(x))).item() if len(x) > 1 else 0.0


def frontier_row(name, per_prompt, kl, n=None, step=None):
    """One row of the frontier: means and standard errors over prompts of the per-prompt rm and
    gold, the means of the answers' length, ending, repeating and log pi_ref per character, and a KL
    in nats; n for a point of best-of-n, step (the iteration or step of the run) for a run's point."""
    (rm, rm_se), (gold, gold_se) = mean_se(per_prompt['rm']), mean_se(per_prompt['gold'])
    return {'method': name, 'n': n, 'step': step, 'gold': gold, 'gold_se': gold_se, 'rm': rm,
            'rm_se': rm_se, 'prob': torch.sigmoid(per_prompt['rm'].float()).mean().item(), 'kl': kl,
            **{k: per_prompt[k].mean().item() for k in FIELDS[9:]}}


@torch.no_grad()
def policy_point(policy, ref, rm, prompts, vocab, max_len, stop, temperature, n_samples, seed, it,
                 chunk=32, method='ppo'):
    """The policy on held-out prompts (P, Tp): n_samples answers each; per-prompt means of gold,
    RM score, length and ending, and the exact KL to the reference summed over each answer (nats),
    averaged (measure_policy). Returns the row and three sample answers."""
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
    """Best-of-n reranking: n answers per prompt (P, Tp), sampled `batch` at a time and scored
    `chunk` at a time, keep the RM's favourite.

    Returns the best answers (P, Ta) and their lengths (P,) and RM scores (P,), and all answers
    (P, n, Ta) with lengths and RM scores (P, n)."""
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
    """Expected values of best-of-n, per prompt, from one set of N samples per prompt: RM scores
    (P, N) rank the samples; values: name -> (P, N) per-sample quantities (gold, length, ...).
    -> {n: {'rm': (P,), name: (P,), ...}} for each n in ns (n <= N)."""
    order = scores.argsort(1)  # rank samples by the RM, lowest first
    ranked = {'rm': scores, **values}
    ranked = {k: v.gather(1, order).double() for k, v in ranked.items()}
    return {n: {k: v @ best_of_n_weights(scores.size(1), n) for k, v in ranked.items()} for n in ns}


@torch.no_grad()
def best_of_n_frontier(ref, rm, prompts, vocab, max_len, stop, temperature, n_max, seed, batch=256,
                       chunk=32, log=None):
    """Best-of-n over the reference policy `ref` for n = 1, 2, 4, ..., n_max on held-out prompts
    (P, Tp), from one pass of n_max answers per prompt. Returns the rows and three sample answers
    (plain and best-of-16). log, if given, gets a progress line every 16 generate() calls.
    KL to the reference: the bound log n - (n-1)/n (Gao et al. 2022; n = 1 is the reference itself)."""
    gen = torch.Generator(prompts.device).manual_seed(seed)
    P = prompts.size(0)
    advance = progress('best-of-n answers', P * n_max, 16 * batch, log) if log else None
    *_, y, lengths, r = best_of_n(ref, rm, prompts, n_max, max_len, stop, temperature, gen, batch,
                                  on_progress=advance, chunk=chunk)  # (P, N, Ta), (P, N), (P, N)
    seqs = torch.cat([prompts.repeat_interleave(n_max, 0), y.view(P * n_max, -1)], 1)  # (P N, Tp + Ta)
    values = {**answer_values(y.view(P * n_max, -1), lengths.flatten(), vocab, stop), 'logp_ref': forward_in_chunks(
        lambda s, n: logp_per_char(ref, s, n, prompts.size(1)), seqs, lengths.flatten(), prompts.size(1), chunk).cpu()}
    ns = [2 ** k for k in range(int(math.log2(n_max)) + 1)]
    curve = best_of_n_curve(r.cpu(), {k: v.view(P, n_max) for k, v in values.items()}, ns)
    rows = [frontier_row('best_of_n', curve[n], math.log(n) - (n - 1) / n, n=n) for n in ns]
    first3 = torch.arange(min(3, P))
    best16 = r[first3, :16].argmax(1).cpu()  # best of the first 16 samples
    samples = {'reference': answer_texts(y[first3, 0], lengths[first3, 0], vocab),
               'best_of_16': answer_texts(y[first3, best16], lengths[first3, best16], vocab)}
    return rows, samples


def best_of_n_kept(out_dir, reference, ref, rm, prompts, vocab, max_len, stop, temperature, n_max, seed,
                   chunk=32, log=print):
    """best_of_n_frontier(), kept in out_dir/best_of_n.json under the digests of everything it
    depends on (the reference's and the RM's checkpoints, the prompts, the settings): the same
    curve for ppo, rloo and grpo of one seed is measured once, and read back by the next run. A
    kept curve of another shape is measured again."""
    key = {'reference': digest(os.path.join(out_dir, reference)), 'reward': digest(os.path.join(out_dir,
           'reward.pt')), 'prompts': digest(prompts), 'seed': seed, 'max_answer_len': max_len,
           'temperature': temperature, 'best_of_max': n_max, 'device': prompts.device.type}
    valid = lambda kept: all(is_row(r) and 'logp_ref' in r for r in kept[0]) and set(kept[1]) == {'reference',
                                                                                               'best_of_16'}
    measure = lambda: best_of_n_frontier(ref, rm, prompts, vocab, max_len, stop, temperature, n_max, seed,
                                         chunk=chunk, log=log)
    return cached(os.path.join(out_dir, 'best_of_n.json'), key, measure, valid, log=log)


@torch.no_grad()
def rm_calibration(policy, rm, prompts, vocab, max_len, stop, temperature, k, seed, tau, chunk=32):
    """How far the RM's P = sigmoid(r_i - r_j) can be trusted on a policy's answers: k answers to each
    prompt (P, Tp), all their pairs labelled as reward.py has the labeler label them (Bradley-Terry at
    tau), the RM's scores measured against the labels and the labeler's own probabilities
    (labeler.pair_metrics): {ece, prob_mae, gold_acc, val_acc, bayes_acc}."""
    gen = torch.Generator(prompts.device).manual_seed(seed)
    *_, y, lengths, r = best_of_n(policy, rm, prompts, k, max_len, stop, temperature, gen, chunk=chunk)
    g = gold_scores(y.flatten(0, 1).cpu(), lengths.flatten().cpu(), vocab).view(len(prompts), k)  # (P, k)
    i, j = all_pairs(k)
    m = pair_metrics(r.cpu(), g, label(g[:, i], g[:, j], tau, torch.Generator().manual_seed(seed)), tau)
    return {key: round(m[key], 4) for key in ('ece', 'prob_mae', 'gold_acc', 'val_acc', 'bayes_acc')}


# ------------------------------------------------------------------ a run's path; every run's frontier
class RunPath:
    """A run's points on the frontier, as PPO and DPO record them: add(step) measures the policy
    on the held-out prompts (policy_point), keeps the row (with the `extra` columns, DPO's beta)
    and its sample answers and prints its eval line; save(out_dir, metrics, names) writes the
    run's json file(s) and then redraws out_dir's frontier from every run there, its own too."""
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
        rows, reference = collect(out_dir)
        if rows:
            save_frontier(rows, out_dir, reference)


def gold_at_kl(curve, kl):
    """The best-of-n curve's gold at a KL: linear in KL between its points, and past its last point
    linear from the last two (then extrapolated is True). curve: rows sorted by KL."""
    k = next((k for k in range(1, len(curve)) if kl <= curve[k]['kl']), len(curve) - 1)
    a, b = curve[k - 1], curve[k]
    return a['gold'] + (b['gold'] - a['gold']) * (kl - a['kl']) / (b['kl'] - a['kl']), kl > curve[-1]['kl']


def eval_result(curve, ppo_row, samples, ppo_samples, prompts, vocab):
    """A run's eval block (ppo.json's 'eval'): reference, best_of_16 and the policy under its
    method's name (ppo, rloo, grpo, dpo: gold, rm, prob, kl, standard errors, samples), the whole
    best-of-n curve, best-of-n's gold at the policy's KL, and the sample prompts."""
    by_n = {row['n']: row for row in curve}
    keep = lambda row, s: {**{k: row.get(k, math.nan) for k in FIELDS[3:]}, 'samples': s}
    same_kl, extrapolated = gold_at_kl(curve, ppo_row['kl'])
    return {'reference': keep(by_n[1], samples['reference']),
            'best_of_16': keep(by_n[16], samples['best_of_16']),
            ppo_row['method']: keep(ppo_row, ppo_samples), 'best_of_n': curve,
            'best_of_n_at_ppo_kl': {'gold': same_kl, 'extrapolated': extrapolated},
            'prompts': [decode(p, vocab) for p in prompts[:3]]}


def print_frontier(curve, path, result):
    """The gold-vs-KL table: best-of-n, then the policy along its run; then the comparisons."""
    print_rows(curve + path)
    name = path[-1]['method']
    ref, bo16, ppo = result['reference'], result['best_of_16'], result[name]
    same, name = result['best_of_n_at_ppo_kl'], name.upper()
    print(f"gold gained over the reference: {name} {ppo['gold'] - ref['gold']:+.3f} at KL {ppo['kl']:.2f}, "
          f"best-of-16 {bo16['gold'] - ref['gold']:+.3f} at KL <= {bo16['kl']:.2f}")
    print(f"best-of-n at {name}'s KL: gold {same['gold']:.3f}" + (' (extrapolated past n = '
          f"{curve[-1]['n']})" if same['extrapolated'] else '') + f", {name} {ppo['gold']:.3f}")


def print_samples(result, method='ppo'):
    """The three sample prompts, each with the reference's, best-of-16's and the policy's answer."""
    for i, p in enumerate(result['prompts']):
        print(f'\n--- prompt {i}: {p!r}')
        for name in ('reference', 'best_of_16', method):
            print(f"{name:>12}: {result[name]['samples'][i]!r}")


def is_row(row):
    """A frontier row as a run writes it: a method's name, n and step (whole numbers or None), a
    number in every measured column (repeats and logp_ref where a run measured them)."""
    present = [k for k in FIELDS[11:] + ['beta'] if isinstance(row, dict) and k in row]
    return (isinstance(row, dict) and isinstance(row.get('method'), str)
            and all(type(row.get(k, 0.5)) in (int, type(None)) for k in ('n', 'step'))
            and all(type(row.get(k)) in (int, float) for k in FIELDS[3:11] + present))


def is_run(run):
    """A run's json as ppo.py and dpo.py write it: its path and eval block, every row readable."""
    rows = run['path'] + run['eval'].get('best_of_n', [])
    return len(run['path']) > 0 and all(map(is_row, rows)) and type(run.get('beta', 0.0)) in (int, float)


def collect(out_dir):
    """Every point the runs in out_dir measured, as frontier rows: best-of-n (from the first run that
    measured it: each run of one seed measures the same curve), the reference itself as 'sft' when it
    is the SFT model, and the path of every run whose json is there (ppo.py's ppo, rloo, grpo, ...,
    dpo.py's dpo_beta<beta>, ...; column beta). Runs of another seed or reference than the first are
    left out, with a note, and so is a damaged json (plumbing.read_json).
    -> (rows, the reference's name); no run with a best-of-n curve: ([], None)."""
    names = sorted(os.path.basename(f)[:-5] for f in glob.glob(os.path.join(out_dir, '*.json')))
    runs = {name: read_json(os.path.join(out_dir, f'{name}.json'), is_run, "a run's results")
            for name in names if name not in NOT_RUNS}
    runs = {name: run for name, run in runs.items() if run is not None}
    first = next((run for run in runs.values() if 'best_of_n' in run['eval']), None)
    if first is None:
        return [], None
    same = lambda run: tuple(run.get(k) for k in ('reference', 'seed', 'eval_prompts'))
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
    """out/frontier.csv (one row per point), and out/frontier.png if matplotlib is installed: gold, RM
    score and the answers' log pi_ref per character against KL to the reference, every run a line
    (DPO one per beta; a run with gold as its reward dashed). Each file is written whole or not at all."""
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
        label = {'best_of_n': 'best-of-n (KL bound)', 'sft': 'SFT'}.get(r['method'], r['method'].upper())
        label = label.replace('_GOLD', ' (gold as reward)')
        lines.setdefault(label + (f" β {r['beta']:g}" if r.get('beta', '') != '' else ''), []).append(r)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, key in zip(axes, ('gold', 'rm', 'logp_ref')):
        for label, pts in lines.items():
            style = 'o-' if label.startswith('best') else '*' if label == 'SFT' else '.--' if 'gold' in label else '.-'
            ax.errorbar([r['kl'] for r in pts], [r.get(key, math.nan) for r in pts], fmt=style, label=label,
                        yerr=[r[key + '_se'] for r in pts] if key + '_se' in pts[0] else None, capsize=2,
                        markersize=12 if label == 'SFT' else 6)
        ax.set_xlabel(f'KL to {reference} (nats)')
        ax.set_ylabel({'gold': 'gold score (hidden)', 'rm': 'reward model score',
                       'logp_ref': f'log-likelihood per character under {reference}'}[key])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(tmp + '.png')
    os.replace(tmp + '.png', os.path.join(out_dir, 'frontier.png'))
    plt.close(fig)


def print_rows(rows):
    """The gold-vs-KL table of frontier rows."""
    print(f"{'method':<10} {'n':>3} {'step':>5} {'gold':>7} {'± se':>6} {'rm':>7} {'prob':>6} {'kl':>7} "
          f"{'length':>6} {'ended':>5} {'repeats':>7} {'logp_ref':>8}")
    for row in rows:
        bound = '<=' if row['method'] == 'best_of_n' and row['n'] > 1 else '  '
        beta = f" β {row['beta']:g}" if row.get('beta', '') != '' else ''
        n, step = ('' if row[k] is None else row[k] for k in ('n', 'step'))
        print(f"{row['method']:<10} {n:>3} {step:>5} {row['gold']:7.3f} {row['gold_se']:6.3f} "
              f"{row['rm']:7.3f} {row['prob']:6.3f} {bound}{row['kl']:5.2f} {row['length']:6.1f} "
              f"{row['ended']:5.2f} {row.get('repeats', math.nan):7.2f} {row.get('logp_ref', math.nan):8.3f}{beta}")


if __name__ == '__main__':
    config = configure(globals(), sys.argv[1:])
    rows, reference = collect(out_dir)
    if not rows:
        die(f'no run of ppo.py in {out_dir} (the best-of-n curve comes with it): run python ppo.py first')
    save_frontier(rows, out_dir, reference)
    print_rows(rows)
    print(f'written: {out_dir}/frontier.csv' + (' and frontier.png' if os.path.exists(
          os.path.join(out_dir, 'frontier.png')) else ' (pip install matplotlib for frontier.png)'))
