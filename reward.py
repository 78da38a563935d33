"""
reward.py: a simulated labeler and a Bradley-Terry reward model. Step 2 of minibard.

The recipe (InstructGPT, Ouyang et al. 2022, section 3.5), with the human replaced by code:
 1. Prompts are the `prompt_len` characters before a turn's first line (the end of a speech,
    the blank line and the next speaker's name) in the training text (held-out prompts: in the
    validation text). For each prompt, K = 16 answers are sampled from the pretrained GPT
    (out/gpt.pt) with the KV-cache generate: each a whole turn, up to and including the blank
    line that ends it, or `max_answer_len` characters if it never ends. All K(K-1)/2 pairs are
    labelled: 120 for 16 sampled answers (K = 8: 28 for 8). Here labels cost nothing and
    answers cost compute, so more pairs per answer is the cheap way to more information;
    InstructGPT's humans ranked 4 to 9, where each comparison costs a person's time.
 2. A hidden gold score g(y) rates each answer: the number of distinct positive words minus
    the number of distinct negative words of a small Shakespearean sentiment lexicon.
 3. The labeler compares all K(K-1)/2 pairs of a prompt and prefers y_i with probability
    sigmoid((g_i - g_j) / tau) (Bradley-Terry). tau = 1: a one-word lead wins 73% of the
    time, InstructGPT's inter-labeller agreement. The labels are sampled, so they are noisy.
 4. The reward model r(x, y) is the GPT trunk (initialised from out/gpt.pt) plus a scalar
    head on every answer character, summed (see RewardModel). It sees prompts, answers and
    labels, never g.
 5. Loss: -log sigmoid(r(x, y_w) - r(x, y_l)), averaged over the K(K-1)/2 pairs of a prompt;
    all K answers of a prompt sit in one batch, so each is forwarded once (InstructGPT: this
    is what keeps a K-wise comparison from overfitting). Two passes over the pairs, the
    learning rate decaying linearly to 0.
 6. Early stopping: a dev set of prompts from the training text (fresh answers and labels) is
    scored `evals` times during training and the RM keeps its best dev loss.
 7. Normalisation: a bias makes the mean reward of base-policy answers to held-out prompts
    0, so sigmoid(r) reads "probability the labeler prefers this answer to a typical base
    answer" (Bradley-Terry against the base model's average).
 8. A reference learner on the same pairs: the Bradley-Terry loss fitted on bag-of-words
    presence features (one weight per word seen in the training answers, L2 chosen on dev).
    It knows nothing of the lexicon, but it splits text into words exactly as the labeler
    does. Beside the Bayes limit it shows how much of the labels' information a simple learner
    extracts, so a weak RM reads as a data limit or a learning gap.
 9. Measured on held-out prompts and freshly sampled labels: agreement with the labels
    (val_acc), the Bayes limit of any model on those pairs (bayes_acc), agreement with the
    noiseless gold order (gold_acc), calibration of sigmoid(r_i - r_j) (ece, prob_mae), the
    reference learner's bow_val_acc and bow_gold_acc, and repeat_gain: what repeating one
    positive word 8 times adds to the score (gold counts it once), in RM standard deviations.

Run:  python reward.py              (after python gpt.py; CPU: ~2.5 min on 2 cores)
      python reward.py --seed=1     (other prompts, answers and labels; the same gpt.pt)
Writes out/reward.pt (model, config, vocab, norm_bias, shapes) and out/reward.json.
"""
import copy
import json
import math
import os
import re
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt import (END_OF_TURN, GPT, GPTConfig, configure, count, decode, die, encode, eta, load_checkpoint,
                 load_model, load_splits, load_weights, prepare_out_dir, progress, save_checkpoint)

# ----------------------------------------------------------------------------------------
# hyperparameters (`--key=value` overrides any of them)
_gpu = torch.cuda.is_available()
device = 'cuda' if _gpu else 'cpu'
out_dir = 'out'                 # reads out_dir/gpt.pt, writes out_dir/reward.pt and reward.json
data_path = 'input.txt'
seed = 1337                     # in [0, inf): prompts, answers, labels and shuffles
prompt_len = 16                 # in [1, inf): the end of a speech and the next speaker's name
max_answer_len = 96             # in [2, inf): a turn ends at its blank line or this long
rm_context = 0                  # in [0, inf): prompt characters the RM reads (the labeler: none)
K = 16                          # in [2, inf): answers per prompt: 120 pairs (InstructGPT: 4..9)
train_prompts = 2500 if _gpu else 1250  # in [1, inf): CPU: 20,000 answers, 150,000 pairs
dev_prompts = 75                # in [1, inf): training-text prompts: early stopping, BoW's L2
val_prompts = 125               # in [1, inf): held-out prompts (validation text): 15,000 pairs
tau = 1.0                       # in (0, inf): labeler noise: P(i > j) = sigmoid((g_i - g_j) / tau)
temperature = 1.0               # in (0, inf): sampling temperature of the base policy
gen_batch = 1024                # in [1, inf): sequences per generate() call
prompts_per_batch = 2           # in [1, inf): prompts per step -> 2 * K answers, 2 * 120 pairs
learning_rate = 5e-4            # in (0, inf): AdamW, whole RM, linear decay to 0 (README)
epochs = 2                      # in [1, inf): passes over the pairs (2 x 25k answers beat 1 x 30k, README)
evals = 4                       # in [1, inf): dev evaluations over the run; the best one is kept
grad_clip = 1.0                 # in (0, inf)
log_interval = 50               # in [1, inf)
# ----------------------------------------------------------------------------------------

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


def choice_prob(g_i, g_j, tau=1.0):
    """The labeler's true P(y_i preferred to y_j) = sigmoid((g_i - g_j) / tau) (Bradley-Terry)."""
    return torch.sigmoid((torch.as_tensor(g_i, dtype=torch.float) - g_j) / tau)


def label(g_i, g_j, tau=1.0, generator=None):
    """Sample the labeler's choice: 1.0 where y_i is preferred, 0.0 where y_j is."""
    return torch.bernoulli(choice_prob(g_i, g_j, tau), generator=generator)


def all_pairs(k):
    """The K(K-1)/2 index pairs (i < j) of one prompt's responses: two LongTensors."""
    i, j = torch.triu_indices(k, k, offset=1)
    return i, j


def pairwise_loss(r, prefs):
    """Bradley-Terry loss. r: (P, K) rewards; prefs: (P, K(K-1)/2), 1 where y_i beat y_j.

    loss = -1/C(K,2) sum_{pairs} log sigmoid(r_w - r_l), averaged over prompts (InstructGPT eq. 1).
    Returns (loss, accuracy of the sign of r_i - r_j against the labels)."""
    i, j = all_pairs(r.size(1))
    d = r[:, i] - r[:, j]                                      # (P, pairs): r_i - r_j
    margin = torch.where(prefs > 0.5, d, -d)                  # r_w - r_l
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


class RewardModel(nn.Module):
    """r(x, y) = b + sum_t w . h_t over the answer's characters t: the GPT trunk (initialised from
    out/gpt.pt) plus a scalar head on every answer character, summed up to the answer's end. The
    sum is a running score: read after t characters it is the score of the answer so far, which
    PPO's critic reuses.

    Why summed, not InstructGPT's single head on the last token: a word-counting labeler scores a
    sum over positions, so this head only has to learn what each stretch of text adds, not also
    where to look (README, section 2). The RM reads the last `context` characters of the prompt
    and the answer; an answer longer than the trunk's block is read over its last block_size
    characters. The head starts at zero (r = 0: no preference); the bias b carries the
    normalisation."""
    def __init__(self, config, context=0):
        super().__init__()
        self.context = context                                # prompt characters the RM reads
        self.trunk = GPT(config)
        self.head = nn.Linear(config.n_embd, 1, bias=False)
        nn.init.zeros_(self.head.weight)
        self.bias = nn.Parameter(torch.zeros(()))             # Bradley-Terry ignores it; set by normalisation

    def contributions(self, seqs, prompt_len):
        """Each answer character's share c_t = w . h_t: seqs (B, Tp + Ta), a prompt of prompt_len
        and the answers -> (B, Ta), or (B, block_size) for answers longer than the block."""
        start = max(0, prompt_len - self.context, seqs.size(1) - self.trunk.config.block_size)
        h = self.trunk.hidden(seqs[:, start:])                 # (B, T', C)
        return self.head(h[:, max(0, prompt_len - start):]).squeeze(-1)

    def forward(self, seqs, prompt_len, lengths=None):
        """r = b + sum of c_t over each answer up to its length: seqs (B, Tp + Ta), lengths (B,)
        (None: all Ta characters are answer) -> rewards (B,)."""
        read = seqs.size(1) - max(0, prompt_len - self.context)     # characters the trunk would read
        if lengths is not None and len(seqs) > 1 and read > self.trunk.config.block_size:
            # past the block each answer is read over the window before its own end: one row at a
            # time (only sample mode writes past the block; training and PPO stay within it)
            return torch.cat([self(seqs[i:i + 1, :prompt_len + int(lengths[i])], prompt_len, lengths[i:i + 1])
                              for i in range(len(seqs))])
        c = self.contributions(seqs, prompt_len)              # (B, Ta') the last Ta' answer characters
        if lengths is not None:                               # padding after an answer's end adds nothing
            c = c * answer_mask(lengths, seqs.size(1) - prompt_len)[:, -c.size(1):]
        return c.sum(1) + self.bias


def answer_mask(lengths, width):
    """(B, width) float mask: 1 on the first lengths[b] positions of each row (the answer), 0 after."""
    return (torch.arange(width, device=lengths.device) < lengths[:, None]).float()


def rewards(rm, seqs, prompt_len, lengths=None, chunk=512):
    """Rewards (N,) of N prompt + answer sequences (N, Tp + Ta) with answer lengths (N,): forwarded
    shortest first in chunks, each cut to its longest answer, so the padding after the answers is
    hardly ever computed. Differentiable; on the RM's device."""
    dev = next(rm.parameters()).device
    if lengths is None:
        lengths = torch.full((len(seqs),), seqs.size(1) - prompt_len)
    order = lengths.argsort(stable=True)
    parts = [rm(seqs[idx, :prompt_len + int(lengths[idx].max())].to(dev), prompt_len, lengths[idx].to(dev))
             for idx in order.split(chunk)]
    return torch.cat(parts)[order.argsort()]                   # back in the order given


score = torch.no_grad()(rewards)                               # the same, for evaluation


@torch.no_grad()
def best_of_n(model, rm, prompts, n, max_len, stop, temperature, generator, batch=1024, top_k=None, done=None):
    """Best-of-n reranking: n answers per prompt (P, Tp), keep the RM's favourite.

    Returns the best answers (P, Ta) and their lengths (P,) and rewards (P,), and all answers
    (P, n, Ta) with lengths and rewards (P, n)."""
    P, Tp = prompts.shape
    rep = prompts.repeat_interleave(n, 0)                               # (P n, Tp)
    y, _, lengths = sample_answers(model, rep, max_len, stop, temperature, generator, batch, top_k, done)
    r = score(rm, torch.cat([rep, y], 1), Tp, lengths).view(P, n)       # (P, n)
    best, idx = r.argmax(1), torch.arange(P)
    y, lengths = y.view(P, n, -1), lengths.view(P, n)
    return y[idx, best], lengths[idx, best], r[idx, best], y, lengths, r


def load_reward_model(path, device='cpu'):
    """(RewardModel in eval mode, vocab, checkpoint dict) from out/reward.pt."""
    ckpt = load_checkpoint(path, run_first='python reward.py')
    rm = RewardModel(GPTConfig(**ckpt['model_args']), ckpt['rm_context'])
    load_weights(rm, ckpt['model'], path, 'python reward.py')
    return rm.to(device).eval(), ckpt['vocab'], ckpt


def turn_starts(data, vocab, prompt_len):
    """Where the speeches of a 1-D token tensor begin, after a blank line and the speaker's name
    ('\\n\\nROMEO:\\n'), with prompt_len tokens before: a LongTensor of positions."""
    text = decode(data, vocab)
    return torch.tensor([m.end() for m in re.finditer(r'\n\n[^\n]+:\n', text) if m.end() >= prompt_len])


def sample_prompts(data, starts, n, length, generator):
    """n prompts: the `length` tokens before a random speech start of `starts` -> (n, length)."""
    ix = starts[torch.randint(len(starts), (n,), generator=generator)]
    return torch.stack([data[i - length:i] for i in ix])


@torch.no_grad()
def sample_answers(model, prompts, max_len, stop, temperature, generator, batch=1024, top_k=None, done=None):
    """One turn after each prompt (N, Tp), ended by the tokens `stop`: answers (N, Ta) padded
    after their end, log-probs (N, Ta), lengths (N,); Ta is the longest answer, at most max_len.
    done(n), if given, is called after each generate() call of n rows (progress lines)."""
    outs = []
    for i in range(0, len(prompts), batch):
        outs.append(model.generate(prompts[i:i + batch], max_len, temperature=temperature, top_k=top_k,
                                   generator=generator, stop=stop))
        if done:
            done(len(outs[-1][0]))
    Ta = max(o[1].size(1) for o in outs)
    pad = lambda x, v: F.pad(x, (0, Ta - x.size(1)), value=v)
    return (torch.cat([pad(o[0][:, prompts.size(1):], stop[-1] if stop else 0) for o in outs]),
            torch.cat([pad(o[1], 0.0) for o in outs]), torch.cat([o[2] for o in outs]))


def ended(answers, lengths, stop):
    """True where an answer (N, Ta) ends, within its length (N,), with the tokens `stop`: the
    speaker stopped, rather than running into max_answer_len."""
    at = (lengths[:, None] - len(stop) + torch.arange(len(stop), device=lengths.device)).clamp(min=0)
    return (lengths >= len(stop)) & (answers.gather(1, at) == torch.tensor(stop, device=answers.device)).all(1)


def answer_texts(answers, lengths, vocab):
    """Each answer (N, Ta) up to its length, as a string."""
    return [decode(a[:n], vocab) for a, n in zip(answers.tolist(), lengths.tolist())]


def gold_scores(answers, lengths, vocab):
    """Gold score of each answer (N, Ta) up to its length -> float tensor (N,)."""
    return torch.tensor([float(gold_score(t)) for t in answer_texts(answers, lengths, vocab)])


def make_preferences(model, data, starts, n_prompts, k, prompt_len, max_len, stop, tau, temperature, vocab, cpu_gen,
                     sample_gen, gen_batch=1024, done=None):
    """Prompts (speech starts of data), k answers each, gold scores and sampled labels of all
    pairs of each prompt. cpu_gen draws prompts and labels, sample_gen (on the model's device)
    the answers. Returns seqs (P, k, Tp + Ta), lengths (P, k), g (P, k), prefs (P, k(k-1)/2)."""
    dev = next(model.parameters()).device
    prompts = sample_prompts(data, starts, n_prompts, prompt_len, cpu_gen).to(dev)  # (P, Tp)
    rep = prompts.repeat_interleave(k, dim=0)                                      # (P k, Tp)
    y, _, lengths = sample_answers(model, rep, max_len, stop, temperature, sample_gen, gen_batch, done=done)
    g = gold_scores(y.cpu(), lengths.cpu(), vocab).view(n_prompts, k)              # (P, k)
    i, j = all_pairs(k)
    prefs = label(g[:, i], g[:, j], tau, generator=cpu_gen)                        # (P, k(k-1)/2)
    return torch.cat([rep, y], 1).view(n_prompts, k, -1).cpu(), lengths.view(n_prompts, k).cpu(), g, prefs


def pair_metrics(r, g, prefs, tau):
    """How well rewards r (P, K) order the K answers of each prompt, against the sampled labels
    prefs (P, K(K-1)/2) and against the gold scores g (P, K) they were drawn from."""
    i, j = all_pairs(r.size(1))
    q = torch.sigmoid(r[:, i] - r[:, j]).flatten()             # model's P(i preferred)
    p = choice_prob(g[:, i], g[:, j], tau).flatten()           # labeler's true P(i preferred)
    y = prefs.flatten()                                        # sampled labels
    dg = (g[:, i] - g[:, j]).flatten()
    differ = dg != 0
    bins = torch.clamp((q * 10).long(), max=9)                 # 10 equal-width bins of q
    ece = sum((bins == b).float().mean() * (q[bins == b].mean() - y[bins == b].mean()).abs()
              for b in range(10) if (bins == b).any())         # sum_b n_b/N |conf_b - freq_b|
    return {'loss': pairwise_loss(r, prefs)[0].item(),
            'val_acc': ((q > 0.5).float() == y).float().mean().item(),
            'bayes_acc': torch.maximum(p, 1 - p).mean().item(),  # best any model can do on these pairs
            'gold_acc': ((q[differ] - 0.5) * dg[differ] > 0).float().mean().item(),
            'ece': float(ece), 'prob_mae': (q - p).abs().mean().item()}


def evaluate(rm, seqs, lengths, g, prefs, tau, prompt_len):
    """Held-out metrics of a reward model (pair_metrics) and the mean and std of its rewards.
    seqs (P, K, T) prompt+answer tokens, lengths and gold scores g (P, K), labels (P, K(K-1)/2)."""
    P, K = g.shape
    r = score(rm, seqs.view(P * K, -1), prompt_len, lengths.flatten()).view(P, K).cpu()  # (P, K)
    return {**pair_metrics(r, g, prefs, tau), 'mean_reward': r.mean().item(), 'std_reward': r.std().item()}


def train_reward_model(rm, train, dev, prompt_len, tau, lr, epochs, prompts_per_batch, evals, grad_clip, generator,
                       log=print, log_interval=50, chunk=8):
    """Fit rm to train = (seqs (P, K, T), lengths, g, prefs) with the pairwise loss, AdamW, the learning
    rate decaying linearly to 0. `evals` times over the run (the last at the end) the RM is
    scored on dev (same form); at the end it keeps the state with the lowest dev loss (early
    stopping). Returns [(step, dev metrics)]. A NaN loss raises FloatingPointError."""
    seqs, lengths, _, prefs = train
    P, K, T = seqs.shape
    dev_ = next(rm.parameters()).device
    opt = torch.optim.AdamW(rm.parameters(), lr=lr, weight_decay=0.0)
    steps = max(1, epochs * (P // prompts_per_batch))
    eval_at = {round(steps * (e + 1) / evals) for e in range(evals)}
    history, best, run_loss, t0 = [], (float('inf'), None), None, time.time()
    for step in range(steps + 1):
        if step in eval_at:                                    # early stopping on the dev pairs
            rm.eval()
            m = evaluate(rm, *dev, tau, prompt_len)
            rm.train()
            history.append((step, m))
            log(f"eval {step}: dev loss {m['loss']:.4f}, dev acc {m['val_acc']:.4f}, dev gold_acc {m['gold_acc']:.4f}")
            if m['loss'] < best[0]:
                best = (m['loss'], copy.deepcopy(rm.state_dict()))
        if step == steps:
            break
        for group in opt.param_groups:
            group['lr'] = lr * (1 - step / steps)             # linear decay to 0
        if step % (P // prompts_per_batch or 1) == 0:
            order = torch.randperm(P, generator=generator)     # a new shuffle each epoch
        b = order[(step * prompts_per_batch) % P:][:prompts_per_batch]
        r = rewards(rm, seqs[b].view(-1, T), prompt_len, lengths[b].flatten(), chunk).view(len(b), K)  # each once
        loss, acc = pairwise_loss(r, prefs[b].to(dev_))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f'reward model loss is {loss.item()} at step {step}')
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), grad_clip)
        opt.step()
        run_loss = loss.item() if run_loss is None else 0.95 * run_loss + 0.05 * loss.item()
        if step % log_interval == 0:
            log(f'iter {count(step, steps)}: loss {run_loss:.4f}, acc {acc.item():.3f}, '
                f'lr {lr * (1 - step / steps):.2e}, {eta(step, steps, t0)}')
    rm.load_state_dict(best[1])
    rm.eval()
    return history


# ------------------------------------------------------------------ the reference learner
def bow_features(texts, index):
    """Word presence as EmbeddingBag input: ids (sum of words per text,) and offsets (N,).
    Each word of `index` found in a text counts once, as the labeler counts it."""
    ids, offsets = [], []
    for t in texts:
        offsets.append(len(ids))
        ids.extend(sorted({index[w] for w in words(t) if w in index}))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


def bow_rewards(theta, features):
    """r(y) = sum over the distinct known words w of y of theta_w: (V,) weights -> (N,)."""
    ids, offsets = features
    return F.embedding_bag(ids, theta[:, None], offsets, mode='sum').squeeze(1)


def fit_bow(features, prefs, n_words, l2):
    """The same Bradley-Terry loss on word-presence features, plus l2 ||theta||^2, fitted to
    convergence by full-batch L-BFGS (convex, so the optimum is found). prefs (P, K(K-1)/2)."""
    theta = torch.zeros(n_words, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=500, history_size=20, line_search_fn='strong_wolfe')
    k = int(round((1 + math.sqrt(1 + 8 * prefs.size(1))) / 2))  # K from K(K-1)/2

    def closure():
        opt.zero_grad()
        loss = pairwise_loss(bow_rewards(theta, features).view(-1, k), prefs)[0] + l2 * theta.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return theta.detach()


def bow_reference(texts, sets, tau, l2_grid=(1e-4, 3e-4, 1e-3, 3e-3)):
    """Fit the bag-of-words learner on texts['train'] with each l2 of the grid, keep the one
    with the lowest dev loss, return its metrics on val. texts: name -> answers (list of str),
    sets: name -> (seqs, lengths, g (P, K), prefs)."""
    index = {w: n for n, w in enumerate(sorted({w for t in texts['train'] for w in words(t)}))}
    feats = {name: bow_features(texts[name], index) for name in texts}
    best = None
    for l2 in l2_grid:
        theta = fit_bow(feats['train'], sets['train'][3], len(index), l2)
        r = {name: bow_rewards(theta, feats[name]).view_as(sets[name][2]) for name in ('dev', 'val')}
        dev_loss = pair_metrics(r['dev'], *sets['dev'][2:], tau)['loss']
        if best is None or dev_loss < best[0]:
            best = (dev_loss, l2, pair_metrics(r['val'], *sets['val'][2:], tau))
    return {'bow_val_acc': best[2]['val_acc'], 'bow_gold_acc': best[2]['gold_acc'], 'bow_l2': best[1],
            'bow_words': len(index)}


@torch.no_grad()
def repeat_rewards(rm, prompts, texts, vocab, repeats=(1, 2, 4, 8), n_max=200):
    """The RM under repetition, a known way to exploit a summed reward. For held-out answers
    (texts, to prompts (N, Tp)) whose gold score comes from exactly one positive word said once,
    the mean reward with that word said n times in a row (the labeler still counts it once):
    ({n: mean r}, answers used). Answers that would outgrow the RM's window are left out."""
    stoi = {ch: i for i, ch in enumerate(vocab)}
    room = rm.trunk.config.block_size - rm.context
    variants = []                                              # (prompt, one text per n)
    for prompt, answer in zip(prompts, texts):
        hits = [m for m in re.finditer(r'[A-Za-z]+', answer) if m.group().lower() in POSITIVE | NEGATIVE]
        if len(hits) != 1 or hits[0].group().lower() not in POSITIVE:
            continue
        m = hits[0]
        said = [answer[:m.start()] + ' '.join([m.group()] * n) + answer[m.end():] for n in repeats]
        if len(said[-1]) <= room:
            variants.append((prompt, said))
        if len(variants) == n_max:
            break
    if not variants:                                           # a tiny run may have none
        return {n: float('nan') for n in repeats}, 0
    out = {}
    for v, n in enumerate(repeats):
        lengths = torch.tensor([len(said[v]) for _, said in variants])
        ids = torch.stack([torch.cat([p, torch.tensor([stoi[c] for c in said[v]] + [0] * (int(lengths.max()) - len(said[v])))])
                           for p, said in variants])
        out[n] = score(rm, ids, prompts.size(1), lengths).mean().item()
    return out, len(variants)


if __name__ == '__main__':
    config = configure(globals(), sys.argv[1:])                      # each option against its rule, then:
    if prompts_per_batch > train_prompts:
        die(f'--prompts_per_batch={prompts_per_batch} is more than --train_prompts={train_prompts}')
    t_start = time.time()
    prepare_out_dir(out_dir)
    torch.manual_seed(seed)
    base, vocab, _ = load_model(os.path.join(out_dir, 'gpt.pt'), device=device)
    if prompt_len + max_answer_len > base.config.block_size:
        die(f'prompt_len + max_answer_len = {prompt_len + max_answer_len} exceeds the GPT block_size '
            f'{base.config.block_size}: lower them')
    train_data, val_data, _ = load_splits(data_path, vocab)
    stop = encode(END_OF_TURN, vocab)
    starts = {'train': turn_starts(train_data, vocab, prompt_len), 'val': turn_starts(val_data, vocab, prompt_len)}
    cpu_gen = torch.Generator().manual_seed(seed)              # prompts, labels, shuffles
    gen = torch.Generator(device).manual_seed(seed)            # answers
    print(f'sampling {K} answers to {train_prompts} train + {dev_prompts} dev + {val_prompts} val prompts ...')
    done = progress('answers', K * (train_prompts + dev_prompts + val_prompts), 4 * gen_batch)
    sets = {name: make_preferences(base, data, starts[text], n, K, prompt_len, max_answer_len, stop, tau, temperature,
                                   vocab, cpu_gen, gen, gen_batch, done)
            for name, data, text, n in [('train', train_data, 'train', train_prompts),
                                        ('dev', train_data, 'train', dev_prompts), ('val', val_data, 'val', val_prompts)]}
    answers = {name: (s[0].view(-1, s[0].size(-1))[:, prompt_len:], s[1].flatten()) for name, s in sets.items()}
    tr_len, tr_g = sets['train'][1].float(), sets['train'][2]
    print(f"{time.time() - t_start:.1f}s: {sets['train'][3].numel()} train, {sets['dev'][3].numel()} dev, "
          f"{sets['val'][3].numel()} val pairs; base answers: {tr_len.mean():.0f} characters on average, "
          f"{ended(*answers['train'], stop).float().mean():.0%} end on their own; gold mean {tr_g.mean():.2f}, "
          f"share non-zero {(tr_g != 0).float().mean():.2f}")

    # the reference learner: bag of words on the same pairs
    texts = {name: answer_texts(*answers[name], vocab) for name in sets}
    bow = bow_reference(texts, sets, tau)
    print(f"{time.time() - t_start:.1f}s: bag of words ({bow['bow_words']} words, l2 {bow['bow_l2']}): "
          f"val_acc {bow['bow_val_acc']:.4f}, gold_acc {bow['bow_gold_acc']:.4f}")

    # the reward model: pretrained trunk + fresh head, dropout off
    args = dict(base.config.__dict__, dropout=0.0)
    rm = RewardModel(GPTConfig(**args), rm_context).to(device)
    rm.trunk.load_state_dict(base.state_dict())
    del base
    try:
        history = train_reward_model(rm, sets['train'], sets['dev'], prompt_len, tau, learning_rate, epochs,
                                     prompts_per_batch, evals, grad_clip, cpu_gen, log_interval=log_interval)
    except FloatingPointError as e:
        die(f'{e}: stopped; {out_dir}/reward.pt was not overwritten. Try a lower --learning_rate')
    best_step = min(history, key=lambda h: h[1]['loss'])[0]
    metrics = evaluate(rm, *sets['val'], tau, prompt_len)
    # normalise: mean reward of base-policy answers to held-out prompts -> 0
    norm_bias = metrics.pop('mean_reward')
    with torch.no_grad():
        rm.bias -= norm_bias
    reps, n_rep = repeat_rewards(rm, sets['val'][0].view(-1, sets['val'][0].size(-1))[:, :prompt_len], texts['val'],
                                 vocab)
    gain = (reps[8] - reps[1]) / metrics['std_reward'] if n_rep and metrics['std_reward'] > 0 else None
    metrics = {'pairs_train': sets['train'][3].numel(), 'pairs_val': sets['val'][3].numel(), **metrics, **bow,
               'answer_len': sets['val'][1].float().mean().item(), 'ended': ended(*answers['val'], stop).float().mean().item(),
               'best_step': best_step, 'repeat_rewards': {str(n): round(r, 4) for n, r in reps.items()},
               'repeat_gain': gain, 'norm_bias': norm_bias, 'seconds': round(time.time() - t_start, 1)}
    metrics.pop('loss')
    save_checkpoint({'model': rm.state_dict(), 'model_args': args, 'config': config, 'vocab': vocab,
                     'norm_bias': norm_bias, 'prompt_len': prompt_len, 'max_answer_len': max_answer_len,
                     'rm_context': rm_context, 'metrics': metrics}, os.path.join(out_dir, 'reward.pt'))
    with open(os.path.join(out_dir, 'reward.json'), 'w') as f:
        json.dump({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, f, indent=2)
    m = metrics
    print('-' * 72)
    print(f"held-out pairs {m['pairs_val']} ({val_prompts} prompts of the validation text x {K * (K - 1) // 2})")
    print(f"{'':22}{'val_acc':>8}{'gold_acc':>10}")
    print(f"{'Bayes limit':22}{m['bayes_acc']:8.4f}{'1':>10}   the best any model can agree with these labels")
    print(f"{'bag of words':22}{m['bow_val_acc']:8.4f}{m['bow_gold_acc']:10.4f}   a simple learner, same pairs")
    print(f"{'reward model':22}{m['val_acc']:8.4f}{m['gold_acc']:10.4f}   what the RM extracted "
          f"(best dev loss at step {best_step})")
    print(f"ece {m['ece']:.4f} (calibration of sigmoid(r_i - r_j), 10 bins), prob_mae {m['prob_mae']:.4f}")
    if gain is not None:
        print(f"repetition: one positive word said 1/2/4/8 times -> mean reward "
              + ' / '.join(f'{r:+.2f}' for r in reps.values()) + f" ({n_rep} answers); "
              f"repeat_gain {gain:+.2f} RM std (gold: +0)")
    print(f"seconds {m['seconds']:.1f}")
