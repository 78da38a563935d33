"""
ppo.py: align the GPT with the reward model by PPO. Step 3 of minibard (InstructGPT's RL step).

The algorithm, as the references do it (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et
al. 2022; Huang et al., "The N Implementation Details of RLHF with PPO"):
 1. On-policy rollouts: `batch_size` prompts (turn starts of the training text, as reward.py
    draws them), one answer each, sampled from the current policy with the KV-cache generate:
    a whole turn up to its blank line, or `max_answer_len` characters if it never ends. Each
    row stops at its own end; the positions after it are padding, masked out of every sum and
    mean below (log-probs, values, KL, GAE, whitening, losses, entropy).
 2. Log-probabilities of the sampled characters under the policy and the frozen reference
    (the pretrained GPT) are computed at the sampling temperature, with dropout off.
 3. Reward per token: r_t = -beta (log pi(y_t|s_t) - log pi_ref(y_t|s_t)), and the frozen
    reward model's score is added on each answer's own last token, scaled to unit std on
    base-policy answers (Ziegler et al. normalise the RM so; ours is already centred there). How
    far the RM spreads answers depends on how well it trained, so without the gain the same beta
    meant a 3x different KL pressure from one reward.pt to the next. An answer cut at
    max_answer_len without ending loses `truncation_penalty` std (Huang et al.; TRL's
    missing_eos_penalty): otherwise a policy could pad its score by never ending.
 4. beta is adapted (Ziegler et al.): e = clip(KL / target - 1, -0.2, 0.2),
    beta <- beta (1 + e n / horizon), n = episodes per iteration; fixed when kl_target = 0.
    The controller is fed the exact KL (below): same mean as the sampled estimate, less noise.
    Ziegler's horizon of 10,000 episodes is for runs of millions; ours has 8,192, so the
    horizon is 5,120: beta can move by up to a third over a run (the old 28 x 64 episodes
    moved it 3%). It starts at 0.5: at 1 the RL objective's optimum is below best-of-16
    (a gain of about 1/beta std at a KL of 1/(2 beta^2) for Gaussian rewards), and at 0.4 the
    KL passed 6 nats. It steers to 3.5 nats: PPO runs past its target early and the controller
    pulls it back, and at 3 nats the way back ended one seed of three close to best-of-16
    (README, section 3).
 5. Advantages by GAE (gamma 1, lambda 0.95) from the critic (7), returns = advantages + values;
    advantages are whitened over the rollout batch.
 6. PPO update: `ppo_epochs` passes over `num_minibatches` shuffled minibatches; clipped
    surrogate (clip 0.2), clipped value loss (0.2), global grad-norm clip; optional entropy
    bonus and optional PPO-ptx (LM loss on input.txt, InstructGPT eq. 2; off by default).
    Small steps spend less KL per unit of gold: lr 1.25e-4 and 128 episodes per iteration
    instead of 3e-4 and 64 (README, section 3: the noise of a policy-gradient step is KL that
    buys no reward). 4 epochs per rollout did worse than 2.
 7. The value function is a separate critic initialised from the reward model (as in
    InstructGPT). Our RM sums a per-token head over the answer, so its running sum
    V(s_t) = b + sum_{k<t} c_k (the score so far) is a useful value from the first iteration:
    GAE's TD errors then give every character its own share of the final score,
    delta_t = c_t - beta kl_t, where a fresh value head passes lambda^(T-1-t) of it
    (0.95^63 = 0.04 to the first of 64 characters). The critic is then trained with the
    clipped value loss.
 8. KL to the reference, logged three ways per iteration (nats per sequence): k1 = sum_t
    log(pi/pi_ref) at the sampled tokens, k3 = sum_t (ratio - 1) - log ratio with ratio =
    pi_ref/pi (Schulman's estimator, never negative), and the exact sum_t KL(pi(.|s_t) ||
    pi_ref(.|s_t)) over all 65 characters.
 9. Evaluation on held-out prompts of the validation text: best-of-n for n = 1, 2, 4, ..., 64
    from one pass of 64 base samples per prompt, with the unbiased estimator over their order
    statistics (Nakano et al. 2021, appendix), at the KL bound log n - (n-1)/n (Gao et al.
    2022); and the policy every `eval_interval` iterations (gold, RM score, exact KL). Gold is
    hidden from training: it is only ever measured, never used to pick a point.
 Left out: per-batch reward whitening (scores are centred and scaled on base answers).

Run:  python ppo.py             (after gpt.py and reward.py; CPU: ~3.5 min on 2 cores)
      python ppo.py --seed=1      (other prompts, rollouts and held-out prompts; same gpt.pt, reward.pt)
Writes out/ppo.pt, out/ppo.json (iters, seconds, eval: base / best_of_16 / ppo / best_of_n curve,
ppo_path), out/ppo_log.csv, out/frontier.csv (+ frontier.png with matplotlib).
"""
import copy
import csv
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt import (END_OF_TURN, GPT, GPTConfig, configure, count, decode, die, encode, eta, load_model, load_splits,
                 prepare_out_dir, progress, save_checkpoint, token_logprobs)
from reward import (answer_mask, answer_texts, best_of_n, ended, gold_scores, load_reward_model, sample_answers,
                    sample_prompts, score, turn_starts)

# ----------------------------------------------------------------------------------------
# hyperparameters (`--key=value` overrides any of them)
_gpu = torch.cuda.is_available()
device = 'cuda' if _gpu else 'cpu'
out_dir = 'out'                 # reads gpt.pt and reward.pt, writes ppo.pt, ppo.json, ppo_log.csv
data_path = 'input.txt'
seed = 1337                     # in [0, inf)
max_iters = 64                  # in [0, inf): PPO iterations (rollout + update)
batch_size = 128                # in [1, inf): episodes (prompts) per iteration
prompt_len = None               # int in [1, inf) or None: None = as out/reward.pt was trained
max_answer_len = None           # int in [2, inf) or None: None = as reward.pt; longer turns are cut
truncation_penalty = 1.0        # in [0, inf): taken off a cut turn's score, in RM std (Huang: 1)
temperature = 1.0               # in (0, inf): of sampling and of log-probs alike (Huang et al.)
ppo_epochs = 2                  # in [1, inf): passes over each rollout
num_minibatches = 2             # in [1, inf): minibatches per pass
learning_rate = 1.25e-4         # in [0, inf): AdamW, constant, policy
critic_lr = 1e-5                # in [0, inf): the critic: a value summed over a turn, small steps
clip_coef = 0.2                 # in (0, inf): PPO ratio clip epsilon
vf_clip = 0.2                   # in (0, inf): value clip around the rollout's values
vf_coef = 0.5                   # in [0, inf): value loss weight (separate nets: only via grad_clip)
ent_coef = 0.0                  # in [0, inf): entropy bonus (0: the KL penalty keeps entropy up)
ptx_coef = 0.0                  # in [0, inf): PPO-ptx weight of the LM loss (InstructGPT: 27.8)
gamma = 1.0                     # in [0, 1]: discount (short episodes, reward at the end)
lam = 0.95                      # in [0, 1]: GAE lambda
init_beta = 0.5                 # in [0, inf): initial KL coefficient, rewards of unit std (point 4)
kl_target = 3.5                 # in [0, inf): nats per answer to steer to; 0 = fixed beta
kl_horizon = 5120               # in [1, inf): episodes for the controller to close the gap
grad_clip = 1.0                 # in (0, inf)
forward_batch_size = 256        # in [1, inf): sequences per no-grad forward (memory bound)
eval_prompts = 256              # in [1, inf): held-out prompts for every reported number
eval_samples = 2                # in [1, inf): answers per held-out prompt at each PPO point
eval_interval = 8               # in [1, inf): evaluate the policy every this many iterations
best_of_max = 64                # in [16, inf): best-of-n for n = 1, 2, 4, ..., this (one pass)
# ----------------------------------------------------------------------------------------


class Critic(nn.Module):
    """V(s_t) for each answer position t, from a trainable copy of the reward model (point 7).

    The RM scores b + sum_k c_k, c_k = w . h_k per character, summed up to the answer's end. The
    critic starts as the score said so far: V(s_t) = gain (b + sum_{k<t} c_k). GAE's TD errors are
    then each character's own share, delta_t = gain c_t - beta kl_t, whatever the answer's length
    (at its last character the reward gain (b + sum_k c_k) minus V leaves gain c_last); the
    value loss then teaches it what the rest of an answer is worth."""
    def __init__(self, rm, gain=1.0):
        super().__init__()
        self.rm = copy.deepcopy(rm)
        self.register_buffer('gain', torch.tensor(float(gain)))     # the same scale as PPO's rewards

    def forward(self, seqs, prompt_len):
        c = self.rm.contributions(seqs, prompt_len)                 # (B, Ta) each character's share
        return self.gain * (self.rm.bias + torch.cumsum(c, 1) - c)  # (B, Ta): the score before t


def response_logits(logits, prompt_len):
    """Logits that predict the response tokens: position t - 1 predicts token t. (B, T, V) -> (B, Tr, V)."""
    return logits[:, prompt_len - 1:-1]


def exact_kl(logits_p, logits_q, temperature=1.0):
    """Per-position KL(p || q) = sum_v p(v) (log p(v) - log q(v)) over the full vocabulary. (..., V) -> (...)."""
    logp = F.log_softmax(logits_p.float() / temperature, -1)
    logq = F.log_softmax(logits_q.float() / temperature, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def kl_estimates(logp, ref_logp):
    """k1 = log(pi/pi_ref) and k3 = (r - 1) - log r with r = pi_ref/pi, per sampled token (Schulman 2020)."""
    log_ratio = ref_logp - logp
    return -log_ratio, log_ratio.exp() - 1 - log_ratio


def per_token_rewards(scores, logp, ref_logp, beta, mask):
    """r_t = -beta (log pi - log pi_ref) at every answer token, plus the RM score on each answer's
    own last token, 0 after it. scores (B,), the rest (B, T) -> (B, T)."""
    rewards = -beta * (logp - ref_logp) * mask
    last = mask.sum(1).long() - 1                                     # (B,) index of the last token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards, values, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016), V after the last token = 0.

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  returns = A + V.
    Padding after an answer's end must have r = V = 0: then it adds nothing and the last real
    token sees V = 0 after it, as if the episode stopped there."""
    T = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages[:, t] = lastgaelam
    return advantages, advantages + values


def masked_mean(x, mask):
    """Mean of x over the positions where mask (same shape, 0/1) is 1: padding does not count."""
    return (x * mask).sum() / mask.sum()


def whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the answer tokens (mask 1); padding stays 0."""
    mean = masked_mean(x, mask)
    return (x - mean) / (masked_mean((x - mean) ** 2, mask).sqrt() + eps) * mask


def ppo_losses(logp, old_logp, advantages, values, old_values, returns, mask, clip_coef, vf_clip):
    """The clipped PPO objectives (Schulman et al. 2017), all (B, T) in, scalars out: means over
    the answer tokens (mask 1), so a padded batch is the same as its episodes one after another.

    ratio = pi/pi_old;  pg_loss = E[max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))]
    v_loss = 1/2 E[max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)]"""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    pg_loss = masked_mean(torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef)), mask)
    v_clipped = old_values + (values - old_values).clamp(-vf_clip, vf_clip)
    v_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1).abs() > clip_coef).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)        # k3 of pi_old vs pi
    return pg_loss, v_loss, clipfrac, approx_kl


class AdaptiveKLController:
    """Ziegler et al. 2019, eq. (2): e = clip(KL/target - 1, -0.2, 0.2); beta *= 1 + e n / horizon."""
    def __init__(self, init_beta, target, horizon):
        self.beta, self.target, self.horizon = init_beta, target, horizon

    def update(self, kl, n_steps):
        if self.target > 0:                                          # target 0: fixed beta
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.beta *= 1 + error * n_steps / self.horizon
        return self.beta


@torch.no_grad()
def forward_rollout(policy, ref, critic, seqs, prompt_len, temperature, chunk):
    """No-grad passes over the rollout in chunks of `chunk`: log pi, log pi_ref (B, Tr), V (B, Tr),
    exact per-token KL (B, Tr), entropy of pi (B, Tr)."""
    outs = []
    for s in seqs.split(chunk):
        logits, values = policy(s)[0], critic(s, prompt_len)
        ref_logits = response_logits(ref(s)[0], prompt_len)
        logits, resp = response_logits(logits, prompt_len), s[:, prompt_len:]
        logp_all = F.log_softmax(logits.float() / temperature, -1)
        outs.append((token_logprobs(logits, resp, temperature), token_logprobs(ref_logits, resp, temperature),
                     values, exact_kl(logits, ref_logits, temperature),
                     -(logp_all.exp() * logp_all).sum(-1)))
    return [torch.cat(x) for x in zip(*outs)]


LOG_FIELDS = ['iter', 'score', 'gold', 'kl', 'kl_k1', 'kl_k3', 'beta', 'length', 'ended', 'clipfrac', 'approx_kl',
              'pg_loss', 'v_loss', 'entropy', 'explained_var', 'time_ms']


def train(policy, ref, critic, reward_fn, get_prompts, cfg, gold_fn=None, lm_batch_fn=None, log=print, on_iter=None):
    """The PPO loop. policy, ref: GPTs; critic(seqs, Tp) -> V (B, Ta); reward_fn(seqs (B, Tp + Ta),
    lengths (B,)) -> scores (B,); get_prompts(n) -> (n, prompt_len) tokens; cfg: this file's
    hyperparameters and `stop`, the end-of-turn tokens. Episodes are whole turns of varying
    length: everything after an answer's end is masked out. Returns the per-iteration log (list
    of dicts). A NaN/inf loss raises FloatingPointError before the update, so nothing bad gets saved."""
    Tp, temp = cfg['prompt_len'], cfg['temperature']
    params = list(policy.parameters()) + list(critic.parameters())
    opt = torch.optim.AdamW([{'params': policy.parameters(), 'lr': cfg['learning_rate']},
                             {'params': critic.parameters(), 'lr': cfg['critic_lr']}], weight_decay=0.0)
    kl_ctl = AdaptiveKLController(cfg['init_beta'], cfg['kl_target'], cfg['kl_horizon'])
    gen = torch.Generator(next(policy.parameters()).device).manual_seed(cfg['seed'])
    shuffle = torch.Generator().manual_seed(cfg['seed'])
    history, t_run = [], time.time()
    policy.eval(), critic.eval()                                      # dropout off during RL
    for it in range(cfg['max_iters']):
        t0 = time.time()
        # ---- rollout: sample a turn, then score every token under the policy, the reference and the RM
        prompts = get_prompts(cfg['batch_size'])                     # (B, Tp)
        seqs, _, lengths = policy.generate(prompts, cfg['max_answer_len'], temperature=temp, generator=gen,
                                           stop=cfg['stop'])         # (B, Tp + Ta), (B,)
        mask = answer_mask(lengths, seqs.size(1) - Tp)               # (B, Ta) 1 up to each answer's end
        logp, ref_logp, values, kl_exact, entropy = forward_rollout(policy, ref, critic, seqs, Tp, temp,
                                                                    cfg['forward_batch_size'])
        values = values * mask                                       # V = 0 after the end (gae)
        scores = torch.cat([reward_fn(s, n) for s, n in zip(seqs.split(cfg['forward_batch_size']),
                                                           lengths.split(cfg['forward_batch_size']))])  # (B,)
        finished = ended(seqs[:, Tp:], lengths, cfg['stop'])         # (B,) did the speaker stop?
        scores = scores - cfg['truncation_penalty'] * (~finished).float()  # a fixed cost for running out
        beta = kl_ctl.beta
        rewards = per_token_rewards(scores, logp, ref_logp, beta, mask)  # (B, Ta)
        advantages, returns = gae(rewards, values, cfg['gamma'], cfg['lam'])
        advantages = whiten(advantages, mask)
        k1, k3 = kl_estimates(logp, ref_logp)
        kl = (kl_exact * mask).sum(1).mean().item()                  # nats per answer
        kl_ctl.update(kl, cfg['batch_size'])
        # ---- PPO update: epochs x shuffled minibatches of whole episodes
        B = seqs.size(0)
        stats = []
        for _ in range(cfg['ppo_epochs']):
            for idx in torch.randperm(B, generator=shuffle).chunk(cfg['num_minibatches']):  # sizes differ by <= 1
                logits = response_logits(policy(seqs[idx])[0], Tp)        # (mb, Ta, V)
                new_values = critic(seqs[idx], Tp) * mask[idx]              # (mb, Ta)
                new_logp = token_logprobs(logits, seqs[idx, Tp:], temp)
                pg_loss, v_loss, clipfrac, approx_kl = ppo_losses(
                    new_logp, logp[idx], advantages[idx], new_values, values[idx], returns[idx], mask[idx],
                    cfg['clip_coef'], cfg['vf_clip'])
                loss = pg_loss + cfg['vf_coef'] * v_loss
                if cfg['ent_coef'] > 0:                              # - c H(pi): a bonus for entropy
                    logp_all = F.log_softmax(logits.float() / temp, -1)
                    loss = loss + cfg['ent_coef'] * masked_mean((logp_all.exp() * logp_all).sum(-1), mask[idx])
                if cfg['ptx_coef'] > 0 and lm_batch_fn is not None:  # InstructGPT eq. 2: + gamma E[log pi(x)]
                    loss = loss + cfg['ptx_coef'] * policy(*lm_batch_fn())[1]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f'PPO loss is {loss.item()} at iter {it}')
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg['grad_clip'])
                opt.step()
                stats.append(torch.stack([pg_loss.detach(), v_loss.detach(), clipfrac, approx_kl]))
        pg, vl, cf, ak = torch.stack(stats).mean(0).tolist()
        row = {'iter': it + 1, 'score': scores.mean().item(),
               'gold': gold_fn(seqs[:, Tp:], lengths).mean().item() if gold_fn else float('nan'),
               'kl': kl, 'kl_k1': (k1 * mask).sum(1).mean().item(), 'kl_k3': (k3 * mask).sum(1).mean().item(),
               'beta': beta, 'length': lengths.float().mean().item(), 'ended': finished.float().mean().item(),
               'clipfrac': cf, 'approx_kl': ak, 'pg_loss': pg, 'v_loss': vl, 'entropy': masked_mean(entropy, mask).item(),
               'explained_var': explained_variance(values, returns, mask), 'time_ms': (time.time() - t0) * 1000}
        history.append(row)
        log(f"iter {count(it + 1, cfg['max_iters'])}: score {row['score']:.3f}, gold {row['gold']:.3f}, kl {kl:.2f} (k1 {row['kl_k1']:.2f}, "
            f"k3 {row['kl_k3']:.2f}), beta {beta:.4f}, length {row['length']:.0f}, ended {row['ended']:.2f}, "
            f"clipfrac {cf:.3f}, approx_kl {ak:.4f}, pg_loss {pg:.4f}, v_loss {vl:.4f}, "
            f"entropy {row['entropy']:.3f}, explained_var {row['explained_var']:.2f}, time {row['time_ms']:.0f} ms, "
            f"{eta(it + 1, cfg['max_iters'], t_run)}")
        if on_iter is not None:
            on_iter(it, row)
    return history


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over the answer tokens: 1 = the critic predicts returns perfectly,
    <= 0 = no better than a constant."""
    var = lambda x: masked_mean((x - masked_mean(x, mask)) ** 2, mask).item()
    return float('nan') if var(returns) == 0 else 1 - var(returns - values) / var(returns)


def best_of_n_weights(N, n):
    """w_i = P(the best of n samples drawn without replacement from N is the i-th lowest-ranked)
    = C(i-1, n-1) / C(N, n), i = 1..N: the unbiased best-of-n estimator over order statistics
    (Nakano et al. 2021, appendix; Gao et al. 2022). (N,) float64, summing to 1."""
    return torch.tensor([math.comb(i - 1, n - 1) / math.comb(N, n) for i in range(1, N + 1)], dtype=torch.float64)


def best_of_n_curve(rm_scores, values, ns):
    """Expected values of best-of-n, per prompt, from one set of N samples per prompt: rm_scores
    (P, N) rank the samples; values: name -> (P, N) per-sample quantities (gold, length, ...).
    -> {n: {'rm': (P,), name: (P,), ...}} for each n in ns (n <= N)."""
    order = rm_scores.argsort(1)                                   # rank samples by the RM, lowest first
    ranked = {'rm': rm_scores, **values}
    ranked = {k: v.gather(1, order).double() for k, v in ranked.items()}
    return {n: {k: v @ best_of_n_weights(rm_scores.size(1), n) for k, v in ranked.items()} for n in ns}


def mean_se(x):
    """(mean, standard error of the mean) of a 1-D tensor of per-prompt values."""
    return x.mean().item(), (x.std() / math.sqrt(len(x))).item() if len(x) > 1 else 0.0


def point(name, n_or_iter, per_prompt, kl):
    """One row of the frontier: means and standard errors over prompts of the per-prompt rm and
    gold, mean answer length and share of answers that ended on their own, and a KL in nats."""
    (rm, rm_se), (gold, gold_se) = mean_se(per_prompt['rm']), mean_se(per_prompt['gold'])
    return {'method': name, 'n_or_iter': n_or_iter, 'gold': gold, 'gold_se': gold_se, 'rm': rm, 'rm_se': rm_se,
            'prob': torch.sigmoid(per_prompt['rm'].float()).mean().item(), 'kl': kl,
            'length': per_prompt['length'].mean().item(), 'ended': per_prompt['ended'].mean().item()}


@torch.no_grad()
def best_of_n_frontier(base, rm, prompts, vocab, max_len, stop, temperature, n_max, seed, chunk=256, log=None):
    """Best-of-n for n = 1, 2, 4, ..., n_max on held-out prompts (P, Tp), from one pass of n_max
    base answers per prompt. Returns the rows and three sample answers (plain and best-of-16).
    log, if given, gets a progress line every 16 generate() calls.
    KL to the base: the bound log n - (n-1)/n (Gao et al. 2022; n = 1 is the base itself)."""
    gen = torch.Generator(prompts.device).manual_seed(seed)
    P = prompts.size(0)
    done = progress('best-of-n answers', P * n_max, 16 * chunk, log) if log else None
    *_, y, lengths, r = best_of_n(base, rm, prompts, n_max, max_len, stop, temperature, gen, chunk,
                                  done=done)                        # (P, N, Ta)
    flat, n_flat = y.view(P * n_max, -1).cpu(), lengths.flatten().cpu()
    values = {'gold': gold_scores(flat, n_flat, vocab), 'length': n_flat.float(), 'ended': ended(flat, n_flat, stop).float()}
    ns = [2 ** k for k in range(int(math.log2(n_max)) + 1)]
    curve = best_of_n_curve(r.cpu(), {k: v.view(P, n_max) for k, v in values.items()}, ns)
    rows = [point('best_of_n', n, curve[n], math.log(n) - (n - 1) / n) for n in ns]
    best16 = r[:3, :16].argmax(1).cpu()                            # best of the first 16 samples
    samples = {'base': answer_texts(y[:3, 0], lengths[:3, 0], vocab),
               'best_of_16': answer_texts(y[torch.arange(min(3, P)), best16], lengths[torch.arange(min(3, P)), best16], vocab)}
    return rows, samples


@torch.no_grad()
def policy_point(policy, base, rm, prompts, vocab, max_len, stop, temperature, n_samples, seed, it, chunk=256):
    """The policy on held-out prompts (P, Tp): n_samples answers each; per-prompt means of gold, RM
    score, length and ending, and the exact KL to the base summed over each answer (nats), averaged."""
    gen = torch.Generator(prompts.device).manual_seed(seed)
    P, Tp = prompts.shape
    rep = prompts.repeat_interleave(n_samples, 0)
    y, _, lengths = sample_answers(policy, rep, max_len, stop, temperature, gen, chunk)
    seqs, mask = torch.cat([rep, y], 1), answer_mask(lengths, y.size(1))
    kl = torch.cat([exact_kl(response_logits(policy(s)[0], Tp), response_logits(base(s)[0], Tp), temperature)
                    for s in seqs.split(chunk)])                   # (P n, Ta) nats per position
    per_answer = {'rm': score(rm, seqs, Tp, lengths), 'gold': gold_scores(y.cpu(), lengths.cpu(), vocab),
                  'length': lengths.float(), 'ended': ended(y, lengths, stop).float()}
    per_prompt = {k: v.cpu().view(P, n_samples).mean(1) for k, v in per_answer.items()}
    return point('ppo', it, per_prompt, (kl * mask).sum(1).mean().item()), answer_texts(y[::n_samples][:3], lengths[::n_samples][:3], vocab)


def held_out_prompts(val_data, vocab, n, prompt_len, seed, device):
    """The evaluation prompts: n speech starts of the validation text, the same for ppo.py and sample.py."""
    starts = turn_starts(val_data, vocab, prompt_len)
    return sample_prompts(val_data, starts, n, prompt_len, torch.Generator().manual_seed(seed + 1)).to(device)


def gold_at_kl(curve, kl):
    """The best-of-n curve's gold at a KL: linear in KL between its points, and past its last point
    linear from the last two (then extrapolated is True). curve: rows sorted by KL."""
    k = next((k for k in range(1, len(curve)) if kl <= curve[k]['kl']), len(curve) - 1)
    a, b = curve[k - 1], curve[k]
    return a['gold'] + (b['gold'] - a['gold']) * (kl - a['kl']) / (b['kl'] - a['kl']), kl > curve[-1]['kl']


def summary(curve, ppo_row, samples, ppo_samples, prompts, vocab):
    """ppo.json's eval block: base, best_of_16 and ppo (gold, rm, prob, kl, standard errors,
    samples), the whole best-of-n curve, best-of-n's gold at PPO's KL, and the sample prompts."""
    by_n = {row['n_or_iter']: row for row in curve}
    keep = lambda row, s: {**{k: row[k] for k in ('gold', 'gold_se', 'rm', 'rm_se', 'prob', 'kl', 'length', 'ended')},
                           'samples': s}
    same_kl, extrapolated = gold_at_kl(curve, ppo_row['kl'])
    return {'base': keep(by_n[1], samples['base']), 'best_of_16': keep(by_n[16], samples['best_of_16']),
            'ppo': keep(ppo_row, ppo_samples), 'best_of_n': curve,
            'best_of_n_at_ppo_kl': {'gold': same_kl, 'extrapolated': extrapolated},
            'prompts': [decode(p, vocab) for p in prompts[:3]]}


def print_frontier(curve, path, result):
    """The gold-vs-KL table: best-of-n, then the PPO policy along its run; then the comparisons."""
    print(f"{'method':<10} {'n/iter':>6} {'gold':>7} {'± se':>6} {'rm':>7} {'prob':>6} {'kl':>7} {'length':>6} {'ended':>5}")
    for row in curve + path:
        bound = '<=' if row['method'] == 'best_of_n' and row['n_or_iter'] > 1 else '  '
        print(f"{row['method']:<10} {row['n_or_iter']:>6} {row['gold']:7.3f} {row['gold_se']:6.3f} "
              f"{row['rm']:7.3f} {row['prob']:6.3f} {bound}{row['kl']:5.2f} {row['length']:6.1f} {row['ended']:5.2f}")
    base, bo16, ppo, same = result['base'], result['best_of_16'], result['ppo'], result['best_of_n_at_ppo_kl']
    print(f"gold gained over the base: PPO {ppo['gold'] - base['gold']:+.3f} at KL {ppo['kl']:.2f}, "
          f"best-of-16 {bo16['gold'] - base['gold']:+.3f} at KL <= {bo16['kl']:.2f}")
    print(f"best-of-n at PPO's KL: gold {same['gold']:.3f}" + (' (extrapolated past n = '
          f"{curve[-1]['n_or_iter']})" if same['extrapolated'] else '') + f", PPO {ppo['gold']:.3f}")


def print_samples(result):
    for i, p in enumerate(result['prompts']):
        print(f'\n--- prompt {i}: {p!r}')
        for name in ('base', 'best_of_16', 'ppo'):
            print(f"{name:>12}: {result[name]['samples'][i]!r}")


def save_frontier(curve, path, out_dir):
    """out/frontier.csv (one row per point), and out/frontier.png if matplotlib is installed."""
    with open(os.path.join(out_dir, 'frontier.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=['method', 'n_or_iter', 'gold', 'gold_se', 'rm', 'rm_se', 'prob', 'kl',
                                          'length', 'ended'])
        w.writeheader()
        w.writerows(curve + path)
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ('gold', 'rm')):
        for rows, label, style in [(curve, 'best-of-n (KL bound)', 'o-'), (path, 'PPO (exact KL)', 's-')]:
            ax.errorbar([r['kl'] for r in rows], [r[key] for r in rows], yerr=[r[key + '_se'] for r in rows],
                        fmt=style, label=label, capsize=2)
        ax.set_xlabel('KL to the base model (nats)')
        ax.set_ylabel({'gold': 'gold score (hidden)', 'rm': 'reward model score'}[key])
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, 'frontier.png'))


if __name__ == '__main__':
    config = configure(globals(), sys.argv[1:])                      # each option against its rule, then:
    if num_minibatches > batch_size:
        die(f'--batch_size={batch_size} must be at least --num_minibatches={num_minibatches} (episodes per minibatch)')
    t_start = time.time()
    prepare_out_dir(out_dir)
    torch.manual_seed(seed)
    base, vocab, gpt_ckpt = load_model(os.path.join(out_dir, 'gpt.pt'), device=device)
    rm, rm_vocab, rm_ckpt = load_reward_model(os.path.join(out_dir, 'reward.pt'), device=device)
    if rm_vocab != vocab or {**rm_ckpt['model_args'], 'dropout': 0} != {**gpt_ckpt['model_args'], 'dropout': 0}:
        die(f'{out_dir}/reward.pt was not trained from this {out_dir}/gpt.pt (other vocabulary or shape): '
            f'run python reward.py again')
    prompt_len = config['prompt_len'] = prompt_len or rm_ckpt['prompt_len']
    max_answer_len = config['max_answer_len'] = max_answer_len or rm_ckpt['max_answer_len']
    if prompt_len + max_answer_len > base.config.block_size:
        die(f'prompt_len + max_answer_len = {prompt_len + max_answer_len} exceeds block_size {base.config.block_size}')
    train_data, val_data, _ = load_splits(data_path, vocab)
    stop = config['stop'] = encode(END_OF_TURN, vocab)
    for p in list(base.parameters()) + list(rm.parameters()):
        p.requires_grad_(False)                                       # frozen reference and RM
    policy = GPT(GPTConfig(**dict(base.config.__dict__, dropout=0.0))).to(device)
    policy.load_state_dict(base.state_dict())
    prompt_gen = torch.Generator().manual_seed(seed)
    starts = turn_starts(train_data, vocab, prompt_len)
    get_prompts = lambda b: sample_prompts(train_data, starts, b, prompt_len, prompt_gen).to(device)
    block = base.config.block_size

    def lm_batch():  # pretraining batches for PPO-ptx: windows of block + 1, inputs and next characters
        ix = torch.randint(len(train_data) - block - 1, (batch_size,), generator=prompt_gen)
        w = torch.stack([train_data[i:i + block + 1] for i in ix]).to(device)
        return w[:, :-1], w[:, 1:]

    log_path, ckpt_path = os.path.join(out_dir, 'ppo_log.csv'), os.path.join(out_dir, 'ppo.pt')
    log_file = open(log_path, 'w', newline='')
    writer = csv.DictWriter(log_file, fieldnames=LOG_FIELDS)
    writer.writeheader()

    with torch.no_grad():  # the RM's std on base answers -> rewards of unit scale (Ziegler et al.)
        seqs0, _, n0 = base.generate(get_prompts(forward_batch_size), max_answer_len, temperature=temperature,
                                     generator=torch.Generator(device).manual_seed(seed), stop=stop)
        gain = 1.0 / rm(seqs0, prompt_len, n0).std().clamp_min(1e-6).item()
    critic = Critic(rm, gain).requires_grad_(True)                    # a trainable copy of the frozen RM
    held_out = held_out_prompts(val_data, vocab, eval_prompts, prompt_len, seed, device)
    print(f'best-of-n, n = 1..{best_of_max}, on {eval_prompts} held-out prompts ...')
    curve, samples = best_of_n_frontier(base, rm, held_out, vocab, max_answer_len, stop, temperature, best_of_max,
                                        seed, log=print)
    path, ppo_samples = [], []

    def evaluate_policy(it):  # the policy on the held-out prompts: one point of its path
        row, s = policy_point(policy, base, rm, held_out, vocab, max_answer_len, stop, temperature, eval_samples,
                              seed, it)
        path.append(row)
        ppo_samples[:] = s
        print(f"eval {it}: gold {row['gold']:.3f} ± {row['gold_se']:.3f}, rm {row['rm']:.3f}, kl {row['kl']:.2f}, "
              f"length {row['length']:.0f}, ended {row['ended']:.2f}")

    def on_iter(it, row):  # one csv row per iteration, flushed so a killed run keeps its log
        writer.writerow(row)
        log_file.flush()
        if (it + 1) % eval_interval == 0 or it + 1 == max_iters:
            evaluate_policy(it + 1)

    print(f'{time.time() - t_start:.1f}s: PPO, {max_iters} iters x {batch_size} turns of <= {max_answer_len} chars, '
          f'device {device}; RM std on base answers {1 / gain:.4f}, so score = RM x {gain:.2f}')
    evaluate_policy(0)
    try:
        history = train(policy, base, critic, lambda s, n: gain * rm(s, prompt_len, n), get_prompts, config,
                        gold_fn=lambda y, n: gold_scores(y.cpu(), n.cpu(), vocab), lm_batch_fn=lm_batch, on_iter=on_iter)
    except FloatingPointError as e:
        die(f'{e}: stopped; {ckpt_path} was not overwritten. Try a lower --learning_rate')
    log_file.close()
    result = summary(curve, path[-1], samples, ppo_samples, held_out, vocab)
    metrics = {'iters': max_iters, 'seconds': round(time.time() - t_start, 1), 'eval': result, 'ppo_path': path}
    save_checkpoint({'model': policy.state_dict(), 'critic': critic.state_dict(),
                     'model_args': dict(policy.config.__dict__), 'config': config, 'vocab': vocab,
                     'iter_num': max_iters, 'metrics': json.loads(json.dumps(metrics))}, ckpt_path)
    with open(os.path.join(out_dir, 'ppo.json'), 'w') as f:
        json.dump(metrics, f, indent=2)
    save_frontier(curve, path, out_dir)
    print_frontier(curve, path, result)
    print_samples(result)
    print(f"seconds {metrics['seconds']}")
