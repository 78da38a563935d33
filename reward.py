"""
reward.py: a simulated labeler and a Bradley-Terry reward model. Step 2 of minibard.

The recipe (InstructGPT, Ouyang et al. 2022, section 3.5), with the human replaced by code:
 1. Prompts are `prompt_len`-character windows of the training text (held-out prompts: of
    the validation text). For each prompt, K = 8 answers of `response_len` characters are
    sampled from the pretrained GPT (out/gpt.pt) with the KV-cache generate. K = 8 gives 28
    labelled pairs for 8 sampled answers (K = 4: 6 for 4), and sampling is what costs here.
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

Run:  python reward.py              (after python gpt.py; CPU: ~2 min on 2 cores)
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

from gpt import (GPT, GPTConfig, configure, decode, die, load_checkpoint, load_model, load_splits, load_weights,
                 prepare_out_dir, save_checkpoint)

# ----------------------------------------------------------------------------------------
# hyperparameters (`--key=value` overrides any of them)
_gpu = torch.cuda.is_available()
device = 'cuda' if _gpu else 'cpu'
out_dir = 'out'                 # reads out_dir/gpt.pt, writes out_dir/reward.pt and reward.json
data_path = 'input.txt'
seed = 1337                     # prompts, answers, labels and shuffles
prompt_len = 32                 # characters of context per prompt
response_len = 64               # characters per sampled answer (prompt + answer <= block_size)
rm_context = 0                  # prompt characters the RM reads before the answer (the labeler reads none)
K = 8                           # answers per prompt: K(K-1)/2 = 28 labelled pairs (InstructGPT: 4..9)
train_prompts = 6250 if _gpu else 3125  # prompts for training: 25,000 answers, 87,500 pairs on CPU
dev_prompts = 150               # prompts of the training text for early stopping and the BoW's L2
val_prompts = 250               # held-out prompts (validation text) for every reported number
tau = 1.0                       # labeler noise: P(i > j) = sigmoid((g_i - g_j) / tau)
temperature = 1.0               # sampling temperature of the base policy
gen_batch = 1024                # sequences per generate() call
prompts_per_batch = 4           # prompts per step -> 4 * K answers, 4 * 28 pairs
learning_rate = 5e-4            # AdamW on the whole RM, linear decay to 0 (1e-3 and 3e-4 did worse)
epochs = 2                      # passes over the pairs (2 x 25k answers beat 1 x 30k, README)
evals = 4                       # dev evaluations over the run; the best one is kept
grad_clip = 1.0
log_interval = 50
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
    out/gpt.pt) plus a scalar head on every answer character, summed. The sum is a running score:
    read after t characters it is the score of the answer so far, which PPO's critic reuses.

    Why summed, not InstructGPT's single head on the last token: a word-counting labeler scores a
    sum over positions, so this head only has to learn what each stretch of text adds, not also
    where to look (README, section 2). The RM reads the last `context` characters of the
    prompt and the answer (window()), whatever the caller passes. The head starts at zero (r = 0:
    no preference); the bias b carries the normalisation."""
    def __init__(self, config, context=0):
        super().__init__()
        self.context = context                                # prompt characters the RM reads
        self.trunk = GPT(config)
        self.head = nn.Linear(config.n_embd, 1, bias=False)
        nn.init.zeros_(self.head.weight)
        self.bias = nn.Parameter(torch.zeros(()))             # Bradley-Terry ignores it; set by normalisation

    def window(self, idx, answer_len):
        """The part of idx (B, T) = prompt + answer that the RM reads: (B, <= context + answer_len)."""
        return idx[:, max(0, idx.size(1) - answer_len - self.context):]

    def contributions(self, idx, answer_len):
        """Each answer character's share c_t = w . h_t: idx (B, T) ends with the answer -> (B, answer_len)."""
        h = self.trunk.hidden(self.window(idx, answer_len))  # (B, T', C)
        return self.head(h[:, h.size(1) - answer_len:]).squeeze(-1)

    def forward(self, idx, answer_len):
        """idx (B, T) prompt+answer tokens -> rewards r = sum_t c_t + b, (B,)."""
        return self.contributions(idx, answer_len).sum(1) + self.bias


@torch.no_grad()
def score(rm, idx, answer_len, batch=512):
    """Rewards (N,) of N sequences (prompt + answer_len answer characters), in chunks on the RM's device."""
    dev = next(rm.parameters()).device
    return torch.cat([rm(idx[i:i + batch].to(dev), answer_len) for i in range(0, len(idx), batch)])


def score_answers(rm, prompts, responses, batch=512):
    """r(x, y) of answers (N, Tr) to prompts (N, Tp) (the RM reads the end of the prompt it knows)."""
    return score(rm, torch.cat([prompts, responses], 1), responses.size(1), batch)


@torch.no_grad()
def best_of_n(model, rm, prompts, n, n_new, temperature, generator, batch=1024, top_k=None):
    """Best-of-n reranking: n samples per prompt (P, Tp), keep the RM's favourite.

    Returns best (P, n_new), its reward (P,), and all samples (P, n, n_new) with rewards (P, n)."""
    P = prompts.size(0)
    rep = prompts.repeat_interleave(n, 0)                               # (P n, Tp)
    y, _ = sample_responses(model, rep, n_new, temperature, generator, batch, top_k)
    r = score_answers(rm, rep, y, batch).view(P, n)                     # (P, n)
    best = r.argmax(1)
    return y.view(P, n, -1)[torch.arange(P), best], r[torch.arange(P), best], y.view(P, n, -1), r


def load_reward_model(path, device='cpu'):
    """(RewardModel in eval mode, vocab, checkpoint dict) from out/reward.pt."""
    ckpt = load_checkpoint(path, run_first='python reward.py')
    rm = RewardModel(GPTConfig(**ckpt['model_args']), ckpt['rm_context'])
    load_weights(rm, ckpt['model'], path, 'python reward.py')
    return rm.to(device).eval(), ckpt['vocab'], ckpt


def sample_prompts(data, n, length, generator):
    """n random windows of `length` tokens from a 1-D token tensor -> (n, length)."""
    ix = torch.randint(len(data) - length, (n,), generator=generator)
    return torch.stack([data[i:i + length] for i in ix])


@torch.no_grad()
def sample_responses(model, prompts, n_new, temperature, generator, batch=1024, top_k=None):
    """Sample n_new tokens after each prompt (N, Tp) -> (responses (N, n_new), logprobs (N, n_new))."""
    outs = [model.generate(prompts[i:i + batch], n_new, temperature=temperature, top_k=top_k, generator=generator,
                           return_logprobs=True) for i in range(0, len(prompts), batch)]
    return torch.cat([o[0][:, prompts.size(1):] for o in outs]), torch.cat([o[1] for o in outs])


def gold_scores(responses, vocab):
    """Gold score of each response row (N, T) -> float tensor (N,)."""
    return torch.tensor([float(gold_score(decode(r, vocab))) for r in responses])


def make_preferences(model, data, n_prompts, k, prompt_len, response_len, tau, temperature, vocab, cpu_gen,
                     sample_gen, gen_batch=1024):
    """Prompts, k answers each, gold scores and sampled labels of all pairs of each prompt.

    cpu_gen draws prompts and labels, sample_gen (on the model's device) the answers.
    Returns seqs (P, k, Tp + Tr), g (P, k), prefs (P, k(k-1)/2)."""
    prompts = sample_prompts(data, n_prompts, prompt_len, cpu_gen).to(next(model.parameters()).device)  # (P, Tp)
    rep = prompts.repeat_interleave(k, dim=0)                                      # (P k, Tp)
    resp, _ = sample_responses(model, rep, response_len, temperature, sample_gen, gen_batch)
    g = gold_scores(resp.cpu(), vocab).view(n_prompts, k)                          # (P, k)
    i, j = all_pairs(k)
    prefs = label(g[:, i], g[:, j], tau, generator=cpu_gen)                        # (P, k(k-1)/2)
    return torch.cat([rep, resp], 1).view(n_prompts, k, -1).cpu(), g, prefs


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


def evaluate(rm, seqs, g, prefs, tau, answer_len, batch=512):
    """Held-out metrics of a reward model (pair_metrics) and its mean reward.
    seqs (P, K, T) prompt+answer tokens, g (P, K) gold scores, prefs (P, K(K-1)/2) labels."""
    P, K = g.shape
    r = score(rm, seqs.reshape(P * K, -1), answer_len, batch).view(P, K).cpu()  # (P, K)
    return {**pair_metrics(r, g, prefs, tau), 'mean_reward': r.mean().item(), 'std_reward': r.std().item()}


def train_reward_model(rm, train, dev, answer_len, tau, lr, epochs, prompts_per_batch, evals, grad_clip, generator,
                       log=print, log_interval=50):
    """Fit rm to train = (seqs (P, K, T), g, prefs) with the pairwise loss, AdamW, the learning
    rate decaying linearly to 0. `evals` times over the run (the last at the end) the RM is
    scored on dev (same form); at the end it keeps the state with the lowest dev loss (early
    stopping). Returns [(step, dev metrics)]. A NaN loss raises FloatingPointError."""
    seqs, _, prefs = train
    P, K, T = seqs.shape
    dev_ = next(rm.parameters()).device
    opt = torch.optim.AdamW(rm.parameters(), lr=lr, weight_decay=0.0)
    steps = max(1, epochs * (P // prompts_per_batch))
    eval_at = {round(steps * (e + 1) / evals) for e in range(evals)}
    history, best, run_loss = [], (float('inf'), None), None
    for step in range(steps + 1):
        if step in eval_at:                                    # early stopping on the dev pairs
            rm.eval()
            m = evaluate(rm, *dev, tau, answer_len)
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
        r = rm(seqs[b].view(-1, T).to(dev_), answer_len).view(len(b), K)  # each answer forwarded once
        loss, acc = pairwise_loss(r, prefs[b].to(dev_))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f'reward model loss is {loss.item()} at step {step}')
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), grad_clip)
        opt.step()
        run_loss = loss.item() if run_loss is None else 0.95 * run_loss + 0.05 * loss.item()
        if step % log_interval == 0:
            log(f'iter {step}: loss {run_loss:.4f}, acc {acc.item():.3f}, lr {lr * (1 - step / steps):.2e}')
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
    sets: name -> (seqs, g (P, K), prefs)."""
    index = {w: n for n, w in enumerate(sorted({w for t in texts['train'] for w in words(t)}))}
    feats = {name: bow_features(texts[name], index) for name in texts}
    best = None
    for l2 in l2_grid:
        theta = fit_bow(feats['train'], sets['train'][2], len(index), l2)
        r = {name: bow_rewards(theta, feats[name]).view_as(sets[name][1]) for name in ('dev', 'val')}
        dev_loss = pair_metrics(r['dev'], *sets['dev'][1:], tau)['loss']
        if best is None or dev_loss < best[0]:
            best = (dev_loss, l2, pair_metrics(r['val'], *sets['val'][1:], tau))
    return {'bow_val_acc': best[2]['val_acc'], 'bow_gold_acc': best[2]['gold_acc'], 'bow_l2': best[1],
            'bow_words': len(index)}


@torch.no_grad()
def repeat_rewards(rm, seqs, prompt_len, vocab, repeats=(1, 2, 4, 8), n_max=200):
    """The RM under repetition, a known way to exploit a summed reward. For held-out answers
    whose gold score comes from exactly one positive word said once, the mean reward with that
    word said n times in a row, the answer cut back to its length (the labeler still counts the
    word once, and the cut text holds no lexicon word): ({n: mean r}, answers used). seqs (N, T)."""
    stoi = {ch: i for i, ch in enumerate(vocab)}
    variants = []                                              # one list of n texts per answer
    for s in seqs:
        answer = decode(s[prompt_len:], vocab)
        hits = [m for m in re.finditer(r'[A-Za-z]+', answer) if m.group().lower() in POSITIVE | NEGATIVE]
        if len(hits) != 1 or hits[0].group().lower() not in POSITIVE:
            continue
        m = hits[0]
        texts = [(answer[:m.start()] + ' '.join([m.group()] * n) + answer[m.end():])[:len(answer)] for n in repeats]
        if all(t.count(m.group()) == n and gold_score(t) == 1 for t, n in zip(texts, repeats)):
            variants.append((s[:prompt_len], texts))
        if len(variants) == n_max:
            break
    if not variants:                                           # a tiny run may have none
        return {n: float('nan') for n in repeats}, 0
    out = {}
    for v, n in enumerate(repeats):
        ids = torch.stack([torch.cat([p, torch.tensor([stoi[c] for c in texts[v]])]) for p, texts in variants])
        out[n] = score(rm, ids, seqs.size(1) - prompt_len).mean().item()
    return out, len(variants)


if __name__ == '__main__':
    config = configure(globals(), sys.argv[1:])
    t_start = time.time()
    prepare_out_dir(out_dir)
    torch.manual_seed(seed)
    base, vocab, _ = load_model(os.path.join(out_dir, 'gpt.pt'), device=device)
    if prompt_len + response_len > base.config.block_size:
        die(f'prompt_len + response_len = {prompt_len + response_len} exceeds the GPT block_size '
            f'{base.config.block_size}: lower them')
    train_data, val_data, _ = load_splits(data_path, vocab)
    cpu_gen = torch.Generator().manual_seed(seed)              # prompts, labels, shuffles
    gen = torch.Generator(device).manual_seed(seed)            # answers
    print(f'sampling {K} answers to {train_prompts} train + {dev_prompts} dev + {val_prompts} val prompts ...')
    sets = {name: make_preferences(base, data, n, K, prompt_len, response_len, tau, temperature, vocab, cpu_gen,
                                   gen, gen_batch)
            for name, data, n in [('train', train_data, train_prompts), ('dev', train_data, dev_prompts),
                                  ('val', val_data, val_prompts)]}
    tr_g = sets['train'][1]
    print(f"{time.time() - t_start:.1f}s: {sets['train'][2].numel()} train, {sets['dev'][2].numel()} dev, "
          f"{sets['val'][2].numel()} val pairs; gold scores of base answers: mean {tr_g.mean():.2f}, "
          f"share non-zero {(tr_g != 0).float().mean():.2f}")

    # the reference learner: bag of words on the same pairs
    texts = {name: [decode(s[prompt_len:], vocab) for s in sets[name][0].view(-1, sets[name][0].size(-1))]
             for name in sets}
    bow = bow_reference(texts, sets, tau)
    print(f"{time.time() - t_start:.1f}s: bag of words ({bow['bow_words']} words, l2 {bow['bow_l2']}): "
          f"val_acc {bow['bow_val_acc']:.4f}, gold_acc {bow['bow_gold_acc']:.4f}")

    # the reward model: pretrained trunk + fresh head, dropout off
    args = dict(base.config.__dict__, dropout=0.0)
    rm = RewardModel(GPTConfig(**args), rm_context).to(device)
    rm.trunk.load_state_dict(base.state_dict())
    del base
    try:
        history = train_reward_model(rm, sets['train'], sets['dev'], response_len, tau, learning_rate, epochs,
                                     prompts_per_batch, evals, grad_clip, cpu_gen, log_interval=log_interval)
    except FloatingPointError as e:
        die(f'{e}: stopped; {out_dir}/reward.pt was not overwritten. Try a lower --learning_rate')
    best_step = min(history, key=lambda h: h[1]['loss'])[0]
    metrics = evaluate(rm, *sets['val'], tau, response_len)
    # normalise: mean reward of base-policy answers to held-out prompts -> 0
    norm_bias = metrics.pop('mean_reward')
    with torch.no_grad():
        rm.bias -= norm_bias
    reps, n_rep = repeat_rewards(rm, sets['val'][0].view(-1, sets['val'][0].size(-1)), prompt_len, vocab)
    gain = (reps[8] - reps[1]) / metrics['std_reward'] if n_rep and metrics['std_reward'] > 0 else None
    metrics = {'pairs_train': sets['train'][2].numel(), 'pairs_val': sets['val'][2].numel(), **metrics, **bow,
               'best_step': best_step, 'repeat_rewards': {str(n): round(r, 4) for n, r in reps.items()},
               'repeat_gain': gain, 'norm_bias': norm_bias, 'seconds': round(time.time() - t_start, 1)}
    metrics.pop('loss')
    save_checkpoint({'model': rm.state_dict(), 'model_args': args, 'config': config, 'vocab': vocab,
                     'norm_bias': norm_bias, 'prompt_len': prompt_len, 'response_len': response_len,
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
