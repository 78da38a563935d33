"""
labeler.py: the simulated labeler, and the yardsticks that knowing it allows.

InstructGPT's human labellers, replaced by code whose preferences are known (README, section 3): a hidden
gold score g(y) of an answer, and a noisy Bradley-Terry choice between two answers. reward.py
asks it for labels; nothing the reward model or PPO trains on ever reads g. Because the choice
rule is known, pair_metrics can measure any scorer of answers against the truth: agreement with
the labels, the best agreement any model can reach on them (the Bayes limit), agreement with the
noiseless gold order, and calibration.
"""
import re
from collections import Counter

import torch

from data import answer_texts, encode

# The labeler's hidden lexicon: whole words, case-insensitive, all frequent in input.txt.
POSITIVE = frozenset('''good love true fair noble honour sweet heaven grace friends peace pardon
    dear gentle hope welcome friend gracious royal fortune comfort joy thank happy truth kind
    mercy worthy kiss content thanks beauty honest virtue brave pleasure merry rich gold wise
    pretty glad blessed precious smile great better best holy faith trust loving valiant victory
    glory safe wisdom bright honourable health laugh pleased'''.split())
NEGATIVE = frozenset('''death blood fear dead die tears shame sorrow kill war murderer grief
    grave hate villain false foul bloody woe traitor ill weep slain sin fool enemy hell enemies
    murder curse rage poison slave sick bitter pain despair wretch treason vile evil wicked
    tyrant plague cursed coward poor wrong lost mad fearful revenge worse sad bad wounds
    dangerous harm weeping slaughter worst guilty angry scorn dishonour danger deadly vengeance
    cruel'''.split())


def words(text):
    """The labeler's words: maximal runs of letters, lower-cased ("Juliet's" -> juliet, s)."""
    return re.findall(r'[a-z]+', text.lower())


def gold_score(text):
    """g(y) = #distinct positive words - #distinct negative words (so 'love love' counts once)."""
    w = set(words(text))
    return len(w & POSITIVE) - len(w & NEGATIVE)


def repeats_a_word(text):
    """Whether a text says a word over and over: twice in a row ('love love'), or a word of 4+
    letters 3 times or more ('good love good love good'): what an over-optimised policy does to a
    summed reward that counts every word said (the labeler counts each distinct word once). On the
    held-out human turns: 4%."""
    w = words(text)
    return any(a == b for a, b in zip(w, w[1:])) or any(c >= 3 and len(x) >= 4 for x, c in Counter(w).items())


def gold_scores(answers, lengths, vocab):
    """g of each answer (N, Ta) up to its length -> float tensor (N,)."""
    return torch.tensor([float(gold_score(t)) for t in answer_texts(answers, lengths, vocab)])


def choice_prob(g_i, g_j, tau=1.0):
    """The labeler's true P(y_i preferred to y_j) = sigmoid((g_i - g_j) / tau) (Bradley-Terry)."""
    return torch.sigmoid((torch.as_tensor(g_i, dtype=torch.float) - g_j) / tau)


def label(g_i, g_j, tau=1.0, generator=None):
    """Sample the labeler's choice: 1.0 where y_i is preferred, 0.0 where y_j is."""
    return torch.bernoulli(choice_prob(g_i, g_j, tau), generator=generator)


def all_pairs(k):
    """The k(k-1)/2 index pairs (i < j) of one prompt's k answers: two LongTensors."""
    i, j = torch.triu_indices(k, k, offset=1)
    return i, j


def pair_metrics(r, g, prefs, tau):
    """How well scores r (P, K) order the K answers of each prompt, against the sampled labels
    prefs (P, K(K-1)/2) and against the gold scores g (P, K) they were drawn from: agreement with
    the labels, the Bayes limit, agreement with the gold order, calibration."""
    i, j = all_pairs(r.size(1))
    q = torch.sigmoid(r[:, i] - r[:, j]).flatten()  # model's P(i preferred)
    p = choice_prob(g[:, i], g[:, j], tau).flatten()  # labeler's true P(i preferred)
    y = prefs.flatten()  # sampled labels
    dg = (g[:, i] - g[:, j]).flatten()
    differ = dg != 0
    bins = torch.clamp((q * 10).long(), max=9)  # 10 equal-width bins of q
    ece = sum((bins == b).float().mean() * (q[bins == b].mean() - y[bins == b].mean()).abs()
              for b in range(10) if (bins == b).any())  # sum_b n_b/N |conf_b - freq_b|
    return {'val_acc': ((q > 0.5).float() == y).float().mean().item(),
            'bayes_acc': torch.maximum(p, 1 - p).mean().item(),  # best any model can do on these pairs
            'gold_acc': ((q[differ] - 0.5) * dg[differ] > 0).float().mean().item(),
            'ece': float(ece), 'prob_mae': (q - p).abs().mean().item(), 'pairs': y.numel()}


def repeated_word(texts, repeats, room, n_max):
    """The answers among texts whose gold score comes from exactly one positive word, said once,
    each with that word said n times in a row for n in repeats (gold counts it once: the same
    score): [(index in texts, [text for each n])], at most n_max, none longer than room."""
    variants = []
    for i, answer in enumerate(texts):
        hits = [w for w in re.finditer(r'[A-Za-z]+', answer) if w.group().lower() in POSITIVE | NEGATIVE]
        if len(hits) != 1 or hits[0].group().lower() not in POSITIVE:
            continue
        hit = hits[0]
        said = [answer[:hit.start()] + ' '.join([hit.group()] * n) + answer[hit.end():] for n in repeats]
        if len(said[-1]) <= room:
            variants.append((i, said))
        if len(variants) == n_max:
            break
    return variants


def repeat_probe(score, prompts, texts, vocab, room, repeats=(1, 2, 4, 8), n_max=200):
    """A known way to exploit a summed reward, tried on a scorer: the mean score(seqs (N, Tp + Ta),
    lengths (N,)) of held-out answers (texts, to prompts (N, Tp)) with their one positive word said
    n times in a row, which the labeler still counts once (repeated_word): ({n: mean score},
    answers used). room: the most answer characters the scorer reads."""
    variants = repeated_word(texts[:len(prompts)], repeats, room, n_max)
    if not variants:  # a tiny run may have none
        return {n: float('nan') for n in repeats}, 0
    out = {}
    for v, n in enumerate(repeats):
        said = [variant[v] for _, variant in variants]
        lengths = torch.tensor([len(s) for s in said])
        answers = [torch.tensor(encode(s, vocab) + [0] * (int(lengths.max()) - len(s))) for s in said]
        ids = torch.stack([torch.cat([prompts[i], a]) for (i, _), a in zip(variants, answers)])  # (N, Tp+Ta)
        out[n] = score(ids, lengths).mean().item()
    return out, len(variants)
