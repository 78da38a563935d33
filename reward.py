"""
reward.py: a simulated labeler and a Bradley-Terry reward model. Step 2 of minibard.

The recipe (InstructGPT, Ouyang et al. 2022, section 3.5), with the human replaced by code:
 1. Prompts are `prompt_len`-character windows of the training text (held-out prompts: of
    the validation text). For each prompt, K responses of `response_len` characters are
    sampled from the pretrained GPT (out/gpt.pt) with the KV-cache generate.
 2. A hidden gold score g(y) rates each response: the number of distinct positive words minus
    the number of distinct negative words of a small Shakespearean sentiment lexicon.
 3. The labeler compares all K(K-1)/2 pairs of a prompt and prefers y_i with probability
    sigmoid((g_i - g_j) / tau) (Bradley-Terry). tau = 1: a one-word lead wins 73% of the
    time, InstructGPT's inter-labeller agreement. The labels are sampled, so they are noisy.
 4. The reward model r(x, y) is the GPT trunk (initialised from out/gpt.pt) plus a scalar
    head on every response token, summed (see RewardModel for why not the last token only).
    It sees prompts, responses and labels, never g.
 5. Loss: -log sigmoid(r(x, y_w) - r(x, y_l)), averaged over the K(K-1)/2 pairs of a prompt;
    all K responses of a prompt sit in one batch, so each is forwarded once. One epoch.
 6. Normalisation: a bias makes the mean reward of base-policy responses to held-out prompts
    0, so sigmoid(r) reads "probability the labeler prefers this answer to a typical base
    answer" (Bradley-Terry against the base model's average).
 7. Measured on held-out prompts and freshly sampled labels: agreement with the labels
    (val_acc), the Bayes limit of any model on those pairs (bayes_acc), agreement with the
    noiseless gold order (gold_acc), calibration of sigmoid(r_i - r_j) (ece, prob_mae).

Run:  python reward.py              (after python gpt.py; CPU: ~1.5 min on 2 cores)
Writes out/reward.pt (model, config, vocab, norm_bias) and out/reward.json.
"""
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
seed = 1337
prompt_len = 32                 # characters of context per prompt
response_len = 64               # characters per sampled response (prompt + response <= block_size)
K = 4                           # responses per prompt, K(K-1)/2 = 6 labelled pairs (InstructGPT: 4..9)
train_prompts = 6000 if _gpu else 2500  # prompts for training; pairs = train_prompts * K(K-1)/2
val_prompts = 1000 if _gpu else 500     # held-out prompts (validation text) for evaluation
tau = 1.0                       # labeler noise: P(i > j) = sigmoid((g_i - g_j) / tau)
temperature = 1.0               # sampling temperature of the base policy
gen_batch = 1024                # sequences per generate() call
prompts_per_batch = 8           # prompts per step -> 8 * K responses, 8 * 6 pairs
learning_rate = 1e-3            # AdamW on the whole reward model
weight_decay = 0.0
epochs = 1                      # reward models overfit after about one epoch (InstructGPT)
grad_clip = 1.0
log_interval = 10
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


def gold_score(text):
    """g(y) = #distinct positive words - #distinct negative words (so 'love love' counts once)."""
    words = set(re.findall(r'[a-z]+', text.lower()))
    return len(words & POSITIVE) - len(words & NEGATIVE)


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
    """r(x, y) = sum_t w . h_t + b over the response positions t: the GPT trunk plus a scalar head
    on every response token, summed, i.e. a running score read at the last token.

    InstructGPT reads one head at the last token only. Measured here (README): on 2 CPU cores'
    worth of preference data that head stays at chance (gold_acc 0.49-0.51, even on noiseless
    labels), while the summed head learns (0.57-0.60 on a 4-layer base, 0.69 on the 2-layer
    default): a word-counting gold score is a sum over positions, so this head only has to
    learn per-position word features, not also where to attend. The head starts at zero
    (r = 0: no preference); b carries the normalisation."""
    def __init__(self, config, prompt_len=32):
        super().__init__()
        self.prompt_len = prompt_len                          # score_answers() crops prompts to it
        self.trunk = GPT(config)
        self.head = nn.Linear(config.n_embd, 1, bias=False)
        nn.init.zeros_(self.head.weight)
        self.bias = nn.Parameter(torch.zeros(()))             # Bradley-Terry ignores it; set by normalisation

    def contributions(self, idx, response_len):
        """Each response character's share c_t = w . h_t: idx (B, T), the last response_len the response -> (B, Tr)."""
        return self.head(self.trunk.hidden(idx)[:, -response_len:]).squeeze(-1)

    def forward(self, idx, response_len):
        """idx (B, T) prompt+response tokens -> rewards r = sum_t c_t + b, (B,)."""
        return self.contributions(idx, response_len).sum(1) + self.bias


@torch.no_grad()
def score(rm, idx, response_len, batch=512):
    """Rewards (N,) of N sequences, forwarded in chunks so a big batch fits in memory."""
    return torch.cat([rm(idx[i:i + batch], response_len) for i in range(0, len(idx), batch)])


def score_answers(rm, prompts, responses, batch=512):
    """r(x, y) of answers (N, Tr) to prompts (N, Tp), the prompt cropped to the RM's prompt_len."""
    return score(rm, torch.cat([prompts[:, -rm.prompt_len:], responses], 1), responses.size(1), batch)


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
    rm = RewardModel(GPTConfig(**ckpt['model_args']), ckpt['prompt_len'])
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


def make_preferences(model, data, n_prompts, vocab, cpu_gen, sample_gen):
    """Prompts, K responses each, gold scores and sampled labels of all pairs of each prompt.

    cpu_gen draws prompts and labels, sample_gen (on the model's device) the responses.
    Returns seqs (P, K, Tp + Tr), g (P, K), prefs (P, K(K-1)/2)."""
    prompts = sample_prompts(data, n_prompts, prompt_len, cpu_gen).to(device)     # (P, Tp)
    rep = prompts.repeat_interleave(K, dim=0)                                      # (P K, Tp)
    resp, _ = sample_responses(model, rep, response_len, temperature, sample_gen, gen_batch)
    g = gold_scores(resp.cpu(), vocab).view(n_prompts, K)                          # (P, K)
    i, j = all_pairs(K)
    prefs = label(g[:, i], g[:, j], tau, generator=cpu_gen)                        # (P, K(K-1)/2)
    return torch.cat([rep, resp], 1).view(n_prompts, K, -1), g, prefs


def evaluate(rm, seqs, g, prefs, tau, batch=512):
    """Held-out metrics of a reward model against the labels and against the truth.
    seqs (P, K, T) prompt+response tokens, g (P, K) gold scores, prefs (P, K(K-1)/2) labels."""
    P, K = g.shape
    r = score(rm, seqs.reshape(P * K, -1), seqs.size(-1) - rm.prompt_len, batch).view(P, K).cpu()  # (P, K)
    i, j = all_pairs(K)
    q = torch.sigmoid(r[:, i] - r[:, j]).flatten()             # model's P(i preferred)
    p = choice_prob(g[:, i], g[:, j], tau).flatten()           # labeler's true P(i preferred)
    y = prefs.flatten()                                        # sampled labels
    dg = (g[:, i] - g[:, j]).flatten()
    differ = dg != 0
    bins = torch.clamp((q * 10).long(), max=9)                 # 10 equal-width bins of q
    ece = sum((bins == b).float().mean() * (q[bins == b].mean() - y[bins == b].mean()).abs()
              for b in range(10) if (bins == b).any())         # sum_b n_b/N |conf_b - freq_b|
    return {'val_acc': ((q > 0.5).float() == y).float().mean().item(),
            'bayes_acc': torch.maximum(p, 1 - p).mean().item(),  # best any model can do on these pairs
            'gold_acc': ((q[differ] - 0.5) * dg[differ] > 0).float().mean().item(),
            'ece': float(ece), 'prob_mae': (q - p).abs().mean().item(), 'mean_reward': r.mean().item()}


if __name__ == '__main__':
    config = configure(globals(), sys.argv[1:])
    t_start = time.time()
    prepare_out_dir(out_dir)
    torch.manual_seed(seed)
    gen = torch.Generator(device).manual_seed(seed)
    base, vocab, _ = load_model(os.path.join(out_dir, 'gpt.pt'), device=device)
    if prompt_len + response_len > base.config.block_size:
        die(f'prompt_len + response_len = {prompt_len + response_len} exceeds the GPT block_size '
            f'{base.config.block_size}: lower them')
    train_data, val_data, _ = load_splits(data_path, vocab)
    print(f'sampling {K} responses to {train_prompts} train + {val_prompts} val prompts ...')
    cpu_gen = torch.Generator().manual_seed(seed)              # prompts, labels, shuffles
    tr_seqs, tr_g, tr_prefs = make_preferences(base, train_data, train_prompts, vocab, cpu_gen, gen)
    va_seqs, va_g, va_prefs = make_preferences(base, val_data, val_prompts, vocab, cpu_gen, gen)
    print(f'{time.time() - t_start:.1f}s: {tr_prefs.numel()} train pairs, {va_prefs.numel()} val pairs; '
          f'gold scores of base samples: mean {tr_g.mean():.2f}, share non-zero {(tr_g != 0).float().mean():.2f}')

    # the reward model: pretrained trunk + fresh head, dropout off (one epoch, little to regularise)
    args = dict(base.config.__dict__, dropout=0.0)
    rm = RewardModel(GPTConfig(**args), prompt_len).to(device)
    rm.trunk.load_state_dict(base.state_dict())
    del base
    opt = torch.optim.AdamW(rm.parameters(), lr=learning_rate, weight_decay=weight_decay)
    steps = epochs * (train_prompts // prompts_per_batch)
    run_loss, run_acc = 0.0, 0.0
    for step in range(steps):
        lr = learning_rate * 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine to 0 over the epoch
        for group in opt.param_groups:
            group['lr'] = lr
        if step % (train_prompts // prompts_per_batch) == 0:
            order = torch.randperm(train_prompts, generator=cpu_gen)  # a new shuffle each epoch
        b = order[(step * prompts_per_batch) % train_prompts:][:prompts_per_batch]
        seqs = tr_seqs[b]                                           # (P, K, T)
        r = rm(seqs.view(-1, seqs.size(-1)), response_len).view(len(b), K)  # each response forwarded once
        loss, acc = pairwise_loss(r, tr_prefs[b].to(device))
        if not math.isfinite(loss.item()):
            die(f'reward model loss is {loss.item()} at step {step}: try a lower --learning_rate')
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), grad_clip)
        opt.step()
        run_loss = loss.item() if step == 0 else 0.95 * run_loss + 0.05 * loss.item()
        run_acc = acc.item() if step == 0 else 0.95 * run_acc + 0.05 * acc.item()
        if step % log_interval == 0 or step == steps - 1:
            print(f'iter {step}: loss {run_loss:.4f}, acc {run_acc:.3f}, lr {lr:.2e}')

    rm.eval()
    metrics = evaluate(rm, va_seqs, va_g, va_prefs, tau)
    # normalise: mean reward of base-policy responses to held-out prompts -> 0
    norm_bias = metrics.pop('mean_reward')
    with torch.no_grad():
        rm.bias -= norm_bias
    metrics = {'pairs_train': tr_prefs.numel(), 'pairs_val': va_prefs.numel(), **metrics,
               'norm_bias': round(norm_bias, 4), 'seconds': round(time.time() - t_start, 1)}
    save_checkpoint({'model': rm.state_dict(), 'model_args': args, 'config': config, 'vocab': vocab,
                     'norm_bias': norm_bias, 'prompt_len': prompt_len, 'response_len': response_len,
                     'metrics': metrics}, os.path.join(out_dir, 'reward.pt'))
    with open(os.path.join(out_dir, 'reward.json'), 'w') as f:
        json.dump({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, f, indent=2)
    print('-' * 60)
    print(f"held-out pairs      {metrics['pairs_val']}")
    print(f"val_acc             {metrics['val_acc']:.4f}   agreement with the labeler's sampled choices")
    print(f"bayes_acc           {metrics['bayes_acc']:.4f}   the best any model can agree on these pairs")
    print(f"gold_acc            {metrics['gold_acc']:.4f}   agreement with the noiseless gold order (gold differs)")
    print(f"ece                 {metrics['ece']:.4f}   calibration error of sigmoid(r_i - r_j), 10 bins")
    print(f"prob_mae            {metrics['prob_mae']:.4f}   mean |sigmoid(r_i - r_j) - true p|")
    print(f"seconds             {metrics['seconds']:.1f}")
