"""
ppo.py: align the GPT with the reward model by PPO. Step 3 of minibard (InstructGPT's RL step).

The algorithm, as the references do it (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et
al. 2022; Huang et al., "The N Implementation Details of RLHF with PPO"):
 1. On-policy rollouts: `batch_size` prompts (speech starts of the training text, as reward.py
    draws them), one answer each from the current policy: a whole turn up to its blank line, or
    `max_answer_len` characters. The positions after an answer's end are padding, masked out of
    every sum and mean below (log-probs, values, KL, GAE, whitening, losses, entropy).
 2. Log-probabilities of the sampled characters under the policy and the frozen reference: the
    policy PPO starts from (`policy`: the SFT model, whose answers reward.pt learnt from, as in
    InstructGPT's eq. 2; gpt.pt on the road without SFT), at the sampling temperature, dropout off.
 3. Reward per token: r_t = -beta (log pi(y_t|s_t) - log pi_ref(y_t|s_t)), plus the frozen reward
    model's score on each answer's own last token, scaled to unit std on the reference's answers
    (Ziegler et al.; ours is already centred there): how far an RM spreads answers depends on its
    training, and beta should mean the same KL pressure for every reward.pt. An answer cut at max_answer_len
    loses `truncation_penalty` std (Huang et al.; TRL's missing_eos_penalty), or a policy could
    pad its score by never ending.
 4. beta is adapted (Ziegler et al.): e = clip(KL / target - 1, -0.2, 0.2), beta <- beta (1 + e n
    / horizon), n = episodes per iteration; fixed when kl_target = 0. It is fed the exact KL (8):
    the same mean as the sampled estimate, less noise. Ziegler's horizon of 10,000 episodes is for
    runs of millions; ours has 8,192, so 5,120 lets beta move by up to a third over a run. It
    starts at init_kl_coef 0.5: for rewards of unit std the RL objective's optimum gains about
    1/beta std at a KL of 1/(2 beta^2) (Gaussian rewards), so beta = 1 would stop short of
    best-of-16. Why a 3.5-nat target: docs/ppo.md.
 5. Advantages by GAE (gamma 1, lambda 0.95) from the critic (7), returns = advantages + values;
    advantages whitened over the rollout batch. Or, with `advantage` rloo or grpo, a critic-free
    group baseline (group_advantages): `group_size` answers to each prompt, each answer's return
    R_i = sum_t r_t (its score and the same per-token KL penalty, gamma 1) less the mean return of
    the other G - 1 answers (RLOO, Ahmadian et al. 2024), or less the group's mean and over its std
    (GRPO, Shao et al. 2024); every character of an answer gets its answer's advantage, no value
    network is trained, and the clipped surrogate is PPO's. GRPO puts the KL in the loss as a k3
    term; here it stays in the reward for every method, so the three differ only in the baseline
    and the adaptive controller steers each to the same KL.
 6. PPO update: `update_epochs` passes over `num_minibatches` shuffled minibatches; clipped
    surrogate (clip_coef 0.2), clipped value loss (cliprange_value 0.2), global grad-norm clip;
    optional entropy bonus and PPO-ptx (LM loss on input.txt, InstructGPT eq. 2; off). Small
    steps (lr 1.25e-4, 128 episodes an iteration): a policy-gradient step's noise is KL that
    buys no reward.
 7. The value function is a separate critic initialised from the reward model (as InstructGPT).
    Our RM sums a per-character head over the answer, so its running sum V(s_t) = b + sum_{k<t}
    c_k (the score so far) is a useful value from the first iteration: GAE's TD errors then give
    every character its own share of the final score, delta_t = c_t - beta kl_t, where a fresh
    value head passes on lambda^(T-1-t) of it (0.95^63 = 0.04 to the first of 64 characters).
 8. KL to the reference, logged three ways (nats per answer): k1 = sum_t log(pi/pi_ref) at the
    sampled tokens, k3 = sum_t (ratio - 1) - log ratio with ratio = pi_ref/pi (Schulman's
    estimator, never negative), and the exact sum_t KL(pi(.|s_t) || pi_ref(.|s_t)) over all 65
    characters.
 9. Evaluation on held-out prompts (frontier.py): best-of-n for n = 1, 2, 4, ..., 64 from one
    pass of 64 answers of the reference per prompt, at the KL bound log n - (n-1)/n (kept in
    out/best_of_n.json: the next run with the same reference, RM, prompts and settings reads it),
    and the policy every `eval_interval` iterations (gold, RM score, exact KL). Gold is only ever
    measured.
 Left out: per-batch reward whitening (scores are centred and scaled on the reference's answers).
 Names follow cleanrl and TRL (clip_coef, vf_coef, ent_coef, gae_lambda, update_epochs,
 max_grad_norm, cliprange_value, init_kl_coef); beta is the KL coefficient of the equations.

Run:  python ppo.py            (after sft.py and reward.py; times and numbers: README)
      python ppo.py --seed=1   (other prompts, rollouts and held-out prompts; same sft.pt, reward.pt)
      python ppo.py --advantage=rloo   (or grpo: the critic-free group baselines, beside PPO's files)
Writes out/ppo.pt, out/ppo.json (policy, reference, iters, seconds, eval: reference / best_of_16 / ppo /
best_of_n curve, path), out/ppo_log.csv (rloo.*, grpo.* for the group baselines), and redraws
out/frontier.csv (+ frontier.png with matplotlib) from every run in out_dir (frontier.py).
"""
import copy
import csv
import json
import os
import sys
import time

import torch
import torch.nn as nn

from frontier import (answer_sum, best_of_n_frontier, collect, policy_point, print_frontier,
                      print_samples, save_frontier, summary)
from gpt import GPT, GPTConfig, load_gpt, log_probs, token_logprobs
from labeler import gold_scores
from plumbing import (END_OF_TURN, ByDevice, answer_mask, by_length, cached, configure, count, die, digest,
                      encode, ended, eta, get_batch, load_splits, prepare_out_dir, run_first, sample_prompts,
                      save_checkpoint, turn_starts)
from reward import load_reward_model, score
from sft import answer_logits, exact_kl, held_out_prompts

# ----------------------------------------------------------------------------------------
# hyperparameters (`--key=value` overrides any of them)
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', ...; sizes follow it
out_dir = 'out'                 # reads <policy> and reward.pt, writes ppo.pt, ppo.json, ppo_log.csv
policy = 'sft.pt'               # a checkpoint of out_dir to start from and keep the KL to (gpt.pt: no SFT)
data_path = 'input.txt'
seed = 1337                     # in [0, inf)
max_iters = 64                  # in [0, inf): PPO iterations (rollout + update)
batch_size = 128                # in [1, inf): episodes (prompts) per iteration
prompt_len = None               # int in [1, inf) or None: None = as out/reward.pt was trained
max_answer_len = None           # int in [2, inf) or None: None = as reward.pt; longer turns are cut
truncation_penalty = 1.0        # in [0, inf): taken off a cut turn's score, in RM std (Huang: 1)
temperature = 1.0               # in (0, inf): of sampling and of log-probs alike (Huang et al.)
update_epochs = 2               # in [1, inf): passes over each rollout (4 did worse: docs/ppo.md)
num_minibatches = 2             # in [1, inf): minibatches per pass
learning_rate = 1.25e-4         # in [0, inf): AdamW, constant, policy
critic_lr = 1e-5                # in [0, inf): the critic: a value summed over a turn, small steps
clip_coef = 0.2                 # in (0, inf): PPO ratio clip epsilon
cliprange_value = 0.2           # in (0, inf): value clip around the rollout's values
vf_coef = 0.5                   # in [0, inf): value loss weight (separate nets: only via max_grad_norm)
ent_coef = 0.0                  # in [0, inf): entropy bonus (0: the KL penalty keeps entropy up)
ptx_coef = 0.0                  # in [0, inf): PPO-ptx weight of the LM loss (InstructGPT: 27.8)
gamma = 1.0                     # in [0, 1]: discount (short episodes, reward at the end)
gae_lambda = 0.95               # in [0, 1]: GAE lambda
advantage = 'gae'               # in {'gae', 'rloo', 'grpo'}: critic and GAE, or a group baseline (point 5)
group_size = 4                  # in [2, inf): rloo / grpo: answers per prompt (batch_size / this prompts)
init_kl_coef = 0.5              # in [0, inf): beta at the start, for rewards of unit std (point 4)
kl_target = 3.5                 # in [0, inf): nats per answer to steer to; 0 = fixed beta
kl_horizon = 5120               # in [1, inf): episodes for the controller to close the gap
max_grad_norm = 1.0             # in (0, inf): global grad-norm clip of policy and critic
forward_batch_size = ByDevice(cpu=32, cuda=256)  # in [1, inf): sequences a no-grad forward (CPU: in cache)
eval_prompts = 256              # in [1, inf): held-out prompts for every reported number
eval_samples = 2                # in [1, inf): answers per held-out prompt at each PPO point
eval_interval = 8               # in [1, inf): evaluate the policy every this many iterations
best_of_max = 64                # in [16, inf): best-of-n for n = 1, 2, 4, ..., this (one pass)
# ----------------------------------------------------------------------------------------
_renamed = {'lam': 'gae_lambda', 'ppo_epochs': 'update_epochs', 'grad_clip': 'max_grad_norm',
            'vf_clip': 'cliprange_value', 'init_beta': 'init_kl_coef'}  # the options' names until Nov 2026


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


def kl_estimates(logp, ref_logp):
    """k1 = log(pi/pi_ref) and k3 = (r - 1) - log r with r = pi_ref/pi, per sampled token
    (Schulman 2020, "Approximating KL divergence")."""
    log_ratio = ref_logp - logp
    return -log_ratio, log_ratio.exp() - 1 - log_ratio


def per_token_rewards(scores, logp, ref_logp, beta, mask):
    """r_t = -beta (log pi - log pi_ref) at every answer token, plus the RM score on each answer's
    own last token, 0 after it. scores (B,), the rest (B, T) -> (B, T)."""
    rewards = -beta * (logp - ref_logp) * mask
    last = mask.sum(1).long() - 1                                     # (B,) index of the last token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards, values, gamma, gae_lambda):
    """Generalised advantage estimation (Schulman et al. 2016), V after the last token = 0.

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lambda A_{t+1};  returns = A + V.
    Padding after an answer's end must have r = V = 0: then it adds nothing and the last real
    token sees V = 0 after it, as if the episode stopped there."""
    T = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        lastgaelam = delta + gamma * gae_lambda * lastgaelam
        advantages[:, t] = lastgaelam
    return advantages, advantages + values


def group_advantages(returns, group_size, scale=False, eps=1e-8):
    """Critic-free advantages from G = group_size answers to each prompt: returns (P G,), the
    answers of a prompt next to each other -> (P G,).

    RLOO (Ahmadian et al. 2024):  A_i = R_i - 1/(G-1) sum_{j != i} R_j   (the leave-one-out baseline)
    GRPO (Shao et al. 2024), scale: A_i = (R_i - mean_j R_j) / (std_j R_j + eps)"""
    R = returns.view(-1, group_size)                                  # (P, G)
    if scale:
        return ((R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + eps)).flatten()
    others = (R.sum(1, keepdim=True) - R) / (group_size - 1)          # mean of the other G - 1 returns
    return (R - others).flatten()


def masked_mean(x, mask):
    """Mean of x over the positions where mask (same shape, 0/1) is 1: padding does not count."""
    return (x * mask).sum() / mask.sum()


def whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the answer tokens (mask 1); padding stays 0."""
    mean = masked_mean(x, mask)
    return (x - mean) / (masked_mean((x - mean) ** 2, mask).sqrt() + eps) * mask


def ppo_losses(logp, old_logp, advantages, values, old_values, returns, mask, clip_coef, cliprange_value):
    """The clipped PPO objectives (Schulman et al. 2017), all (B, T) in, scalars out: means over
    the answer tokens (mask 1), so a padded batch is the same as its episodes one after another.

    ratio = pi/pi_old;  pg_loss = E[max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))], eps = clip_coef
    v_loss = 1/2 E[max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)], c = cliprange_value"""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    pg_losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef))
    pg_loss = masked_mean(pg_losses, mask)
    v_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    v_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1).abs() > clip_coef).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)        # k3 of pi_old vs pi
    return pg_loss, v_loss, clipfrac, approx_kl


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over the answer tokens: 1 = the critic predicts returns perfectly,
    <= 0 = no better than a constant."""
    var = lambda x: masked_mean((x - masked_mean(x, mask)) ** 2, mask).item()
    return float('nan') if var(returns) == 0 else 1 - var(returns - values) / var(returns)


class AdaptiveKLController:
    """Ziegler et al. 2019, eq. (2): e = clip(KL/target - 1, -0.2, 0.2); beta *= 1 + e n / horizon."""
    def __init__(self, init_kl_coef, target, horizon):
        self.beta, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, kl, n_steps):
        if self.target > 0:                                          # target 0: fixed beta
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.beta *= 1 + error * n_steps / self.horizon
        return self.beta


@torch.no_grad()
def forward_rollout(policy, ref, critic, seqs, lengths, prompt_len, temperature, chunk):
    """No-grad passes over the rollout seqs (B, Tp + Ta) with answer lengths (B,), `chunk` at a
    time, each cut to its longest answer (plumbing.by_length): log pi, log pi_ref, V (0 without a
    critic), the exact per-token KL(pi || pi_ref) and the entropy of pi, each (B, Ta), 0 past the
    chunk's longest answer."""
    def passes(s, _):
        logits = answer_logits(policy(s)[0], prompt_len)                # (b, t, V)
        ref_logits = answer_logits(ref(s)[0], prompt_len)
        answer, logp_all = s[:, prompt_len:], log_probs(logits, temperature)
        return (token_logprobs(logits, answer, temperature),             # log pi(y_t | s_t)
                token_logprobs(ref_logits, answer, temperature),         # log pi_ref(y_t | s_t)
                critic(s, prompt_len) if critic else logits.new_zeros(logits.shape[:2]),  # V(s_t)
                exact_kl(logits, ref_logits, temperature),               # KL(pi || pi_ref) at s_t
                -(logp_all.exp() * logp_all).sum(-1))                    # H(pi(.|s_t))
    return by_length(passes, seqs, lengths, prompt_len, chunk)


LOG_FIELDS = ['iter', 'score', 'gold', 'kl', 'kl_k1', 'kl_k3', 'beta', 'length', 'ended', 'clipfrac',
              'approx_kl', 'pg_loss', 'v_loss', 'entropy', 'explained_var', 'time_ms']


def train(policy, ref, critic, reward_fn, get_prompts, *, prompt_len, max_answer_len, stop, temperature, seed,
          max_iters, batch_size, update_epochs, num_minibatches, learning_rate, critic_lr, clip_coef,
          cliprange_value, vf_coef, ent_coef, ptx_coef, gamma, gae_lambda, init_kl_coef, kl_target,
          kl_horizon, max_grad_norm, truncation_penalty, forward_batch_size, advantage='gae', group_size=1,
          gold_fn=None, lm_batch_fn=None, log=print, on_iter=None):
    """The PPO loop. policy, ref: GPTs; critic(seqs, Tp) -> V (B, Ta), or None for a group baseline
    (advantage 'rloo' or 'grpo': batch_size / group_size prompts, group_size answers each);
    reward_fn(seqs (B, Tp + Ta), lengths (B,)) -> scores (B,); get_prompts(n) -> (n, prompt_len)
    tokens; stop: the end-of-turn tokens; the rest: this file's hyperparameters. Episodes are
    whole turns of varying length: everything after an answer's end is masked out. Returns the
    per-iteration log (list of dicts). A NaN/inf loss raises FloatingPointError before the
    update, so nothing bad gets saved."""
    Tp, chunk = prompt_len, forward_batch_size
    groups = [{'params': list(policy.parameters()), 'lr': learning_rate}]
    if critic is not None:
        groups.append({'params': list(critic.parameters()), 'lr': critic_lr})
    params = [p for g in groups for p in g['params']]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    kl_ctl = AdaptiveKLController(init_kl_coef, kl_target, kl_horizon)
    gen = torch.Generator(next(policy.parameters()).device).manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    history, t_run = [], time.time()
    policy.eval()                                                    # dropout off during RL
    if critic is not None:
        critic.eval()
    G = 1 if advantage == 'gae' else group_size
    for it in range(max_iters):
        t0 = time.time()
        # ---- rollout: sample a turn, then score every token under the policy, the reference and the RM
        prompts = get_prompts(batch_size // G).repeat_interleave(G, 0)  # (B, Tp): G answers a prompt
        seqs, _, lengths = policy.generate(prompts, max_answer_len, temperature=temperature, generator=gen,
                                           stop=stop)                # (B, Tp + Ta), (B,)
        mask = answer_mask(lengths, seqs.size(1) - Tp)               # (B, Ta) 1 up to each answer's end
        logp, ref_logp, values, kl_exact, entropy = forward_rollout(policy, ref, critic, seqs, lengths, Tp,
                                                                    temperature, chunk)  # (B, Ta) each
        values = values * mask                                       # V = 0 after the end (gae)
        scores = reward_fn(seqs, lengths)                            # (B,)
        finished = ended(seqs[:, Tp:], lengths, stop)                # (B,) did the speaker stop?
        scores = scores - truncation_penalty * (~finished).float()   # a fixed cost for running out
        beta = kl_ctl.beta
        rewards = per_token_rewards(scores, logp, ref_logp, beta, mask)  # (B, Ta)
        if advantage == 'gae':
            advantages, returns = gae(rewards, values, gamma, gae_lambda)
            advantages = whiten(advantages, mask)
        else:                                                        # R_i = sum_t r_t; no critic: V = 0
            advantages = group_advantages(rewards.sum(1), G, scale=advantage == 'grpo')[:, None] * mask
            returns = values
        k1, k3 = kl_estimates(logp, ref_logp)
        kl = answer_sum(kl_exact, mask)                              # nats per answer
        kl_ctl.update(kl, batch_size)
        # ---- PPO update: epochs x shuffled minibatches of whole episodes
        B = seqs.size(0)
        stats = []
        for _ in range(update_epochs):
            for idx in torch.randperm(B, generator=shuffle).chunk(num_minibatches):  # sizes differ by <= 1
                logits = answer_logits(policy(seqs[idx])[0], Tp)             # (mb, Ta, V)
                new_values = critic(seqs[idx], Tp) * mask[idx] if critic else values[idx]  # (mb, Ta)
                new_logp = token_logprobs(logits, seqs[idx, Tp:], temperature)
                pg_loss, v_loss, clipfrac, approx_kl = ppo_losses(
                    new_logp, logp[idx], advantages[idx], new_values, values[idx], returns[idx], mask[idx],
                    clip_coef, cliprange_value)
                loss = pg_loss + vf_coef * v_loss
                if ent_coef > 0:                                     # - c H(pi): a bonus for entropy
                    logp_all = log_probs(logits, temperature)
                    loss = loss + ent_coef * masked_mean((logp_all.exp() * logp_all).sum(-1), mask[idx])
                if ptx_coef > 0 and lm_batch_fn is not None:         # InstructGPT eq. 2: + gamma E[log pi(x)]
                    loss = loss + ptx_coef * policy(*lm_batch_fn())[1]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f'PPO loss is {loss.item()} at iter {it}')
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                stats.append(torch.stack([pg_loss.detach(), v_loss.detach(), clipfrac, approx_kl]))
        pg, vl, cf, ak = torch.stack(stats).mean(0).tolist()
        row = {'iter': it + 1, 'score': scores.mean().item(),
               'gold': gold_fn(seqs[:, Tp:], lengths).mean().item() if gold_fn else float('nan'),
               'kl': kl, 'kl_k1': answer_sum(k1, mask), 'kl_k3': answer_sum(k3, mask), 'beta': beta,
               'length': lengths.float().mean().item(), 'ended': finished.float().mean().item(),
               'clipfrac': cf, 'approx_kl': ak, 'pg_loss': pg, 'v_loss': vl,
               'entropy': masked_mean(entropy, mask).item(),
               'explained_var': explained_variance(values, returns, mask),
               'time_ms': (time.time() - t0) * 1000}
        history.append(row)
        log(f"iter {count(it + 1, max_iters)}: score {row['score']:.3f}, gold {row['gold']:.3f}, kl {kl:.2f} "
            f"(k1 {row['kl_k1']:.2f}, k3 {row['kl_k3']:.2f}), beta {beta:.4f}, length {row['length']:.0f}, "
            f"ended {row['ended']:.2f}, clipfrac {cf:.3f}, approx_kl {ak:.4f}, pg_loss {pg:.4f}, "
            f"v_loss {vl:.4f}, entropy {row['entropy']:.3f}, explained_var {row['explained_var']:.2f}, "
            f"time {row['time_ms']:.0f} ms, {eta(it + 1, max_iters, t_run)}")
        if on_iter is not None:
            on_iter(it, row)
    return history


if __name__ == '__main__':
    config = configure(globals(), sys.argv[1:])                      # each option against its rule, then:
    if num_minibatches > batch_size:
        die(f'--batch_size={batch_size} must be at least --num_minibatches={num_minibatches} '
            '(episodes per minibatch)')
    if advantage != 'gae' and batch_size % group_size:
        die(f'--batch_size={batch_size} must be a multiple of --group_size={group_size} ({advantage}: '
            'whole groups of answers to a prompt)')
    name = 'ppo' if advantage == 'gae' else advantage                 # ppo.*, rloo.*, grpo.*: side by side
    t_start = time.time()
    prepare_out_dir(out_dir)
    torch.manual_seed(seed)
    rm_path = os.path.join(out_dir, 'reward.pt')
    rm, rm_vocab, rm_checkpoint = load_reward_model(rm_path, device=device)
    labelled = rm_checkpoint.get('policy', 'gpt.pt')                # whose answers the RM learnt from
    reference = config['reference'] = policy                         # PPO's start, and its KL's reference
    ref, vocab, ref_checkpoint = load_gpt(os.path.join(out_dir, reference), run_first(reference), device)
    shape = lambda checkpoint: {**checkpoint['model_args'], 'dropout': 0}
    if rm_vocab != vocab or shape(rm_checkpoint) != shape(ref_checkpoint):
        die(f'{out_dir}/reward.pt was not trained from this {out_dir}/{reference} (other vocabulary or '
            f'shape): run python reward.py --policy={reference} again')
    if reference != labelled:
        print(f'note: {out_dir}/reward.pt learnt from answers of {labelled}, and PPO starts from '
              f'{reference}: for one road, give both stages the same --policy', file=sys.stderr)
    prompt_len = config['prompt_len'] = prompt_len or rm_checkpoint['prompt_len']
    max_answer_len = config['max_answer_len'] = max_answer_len or rm_checkpoint['max_answer_len']
    if prompt_len + max_answer_len > ref.config.block_size:
        die(f'prompt_len + max_answer_len = {prompt_len + max_answer_len} exceeds block_size '
            f'{ref.config.block_size}')
    train_data, val_data, _ = load_splits(data_path, vocab)
    stop = config['stop'] = encode(END_OF_TURN, vocab)
    for p in list(ref.parameters()) + list(rm.parameters()):
        p.requires_grad_(False)                                       # frozen reference and RM
    policy = GPT(GPTConfig(**dict(ref.config.__dict__, dropout=0.0))).to(device)
    policy.load_state_dict(ref.state_dict())
    prompt_gen = torch.Generator().manual_seed(seed)
    starts = turn_starts(train_data, vocab, prompt_len)
    get_prompts = lambda b: sample_prompts(train_data, starts, b, prompt_len, prompt_gen).to(device)
    lm_batch = lambda: get_batch(train_data, ref.config.block_size, batch_size, prompt_gen, device)  # ptx
    log_path, ckpt_path = os.path.join(out_dir, f'{name}_log.csv'), os.path.join(out_dir, f'{name}.pt')
    log_file = open(log_path, 'w', newline='')
    writer = csv.DictWriter(log_file, fieldnames=LOG_FIELDS)
    writer.writeheader()

    with torch.no_grad():  # the RM's std on the reference's answers -> rewards of unit scale (Ziegler et al.)
        seqs0, _, n0 = ref.generate(get_prompts(256), max_answer_len, temperature=temperature,  # 256 answers
                                     generator=torch.Generator(device).manual_seed(seed), stop=stop)
        gain = 1.0 / rm(seqs0, prompt_len, n0).std().clamp_min(1e-6).item()
    critic = Critic(rm, gain).requires_grad_(True) if advantage == 'gae' else None  # a copy of the RM
    held_out = held_out_prompts(val_data, vocab, eval_prompts, prompt_len, seed, device)
    print(f'best-of-n, n = 1..{best_of_max}, on {eval_prompts} held-out prompts ...')
    bon_key = {'reference': digest(os.path.join(out_dir, reference)), 'reward': digest(rm_path),
               'prompts': digest(held_out), 'seed': seed, 'max_answer_len': max_answer_len,
               'temperature': temperature, 'best_of_max': best_of_max, 'device': torch.device(device).type}
    curve, samples = cached(os.path.join(out_dir, 'best_of_n.json'), bon_key, lambda: best_of_n_frontier(
        ref, rm, held_out, vocab, max_answer_len, stop, temperature, best_of_max, seed,
        chunk=forward_batch_size, log=print))                        # the same for ppo, rloo, grpo
    path, ppo_samples = [], []

    def evaluate_policy(it):  # the policy on the held-out prompts: one point of its path
        row, s = policy_point(policy, ref, rm, held_out, vocab, max_answer_len, stop, temperature,
                              eval_samples, seed, it, forward_batch_size, method=name)
        path.append(row)
        ppo_samples[:] = s
        print(f"eval {it}: gold {row['gold']:.3f} ± {row['gold_se']:.3f}, rm {row['rm']:.3f}, "
              f"kl {row['kl']:.2f}, length {row['length']:.0f}, ended {row['ended']:.2f}")

    def on_iter(it, row):  # one csv row per iteration, flushed so a killed run keeps its log
        writer.writerow(row)
        log_file.flush()
        if (it + 1) % eval_interval == 0 or it + 1 == max_iters:
            evaluate_policy(it + 1)

    groups = '' if advantage == 'gae' else f', {batch_size // group_size} prompts x {group_size} ({name})'
    print(f'{time.time() - t_start:.1f}s: PPO, {max_iters} iters x {batch_size} turns of <= {max_answer_len} '
          f"chars{groups}, device {device}; RM std on {reference}'s answers {1 / gain:.4f}, so score = RM x "
          f'{gain:.2f}')
    evaluate_policy(0)
    try:
        train(policy, ref, critic, lambda s, n: gain * score(rm, s, prompt_len, n, forward_batch_size),
              get_prompts, prompt_len=prompt_len, max_answer_len=max_answer_len, stop=stop,
              temperature=temperature, seed=seed, max_iters=max_iters, batch_size=batch_size,
              update_epochs=update_epochs, num_minibatches=num_minibatches, learning_rate=learning_rate,
              critic_lr=critic_lr, clip_coef=clip_coef, cliprange_value=cliprange_value, vf_coef=vf_coef,
              ent_coef=ent_coef, ptx_coef=ptx_coef, gamma=gamma, gae_lambda=gae_lambda,
              init_kl_coef=init_kl_coef, kl_target=kl_target, kl_horizon=kl_horizon,
              max_grad_norm=max_grad_norm, truncation_penalty=truncation_penalty,
              forward_batch_size=forward_batch_size, advantage=advantage, group_size=group_size,
              gold_fn=lambda y, n: gold_scores(y.cpu(), n.cpu(), vocab), lm_batch_fn=lm_batch,
              on_iter=on_iter)
    except FloatingPointError as e:
        die(f'{e}: stopped; {ckpt_path} was not overwritten. Try a lower --learning_rate')
    log_file.close()
    result = summary(curve, path[-1], samples, ppo_samples, held_out, vocab)
    metrics = {'policy': reference, 'reference': reference, 'advantage': advantage, 'seed': seed,
               'eval_prompts': eval_prompts, 'iters': max_iters,
               'seconds': round(time.time() - t_start, 1), 'eval': result, 'path': path}
    save_checkpoint({'model': policy.state_dict(), 'critic': critic.state_dict() if critic else None,
                     'model_args': dict(policy.config.__dict__), 'config': config, 'vocab': vocab,
                     'iter_num': max_iters, 'metrics': json.loads(json.dumps(metrics))}, ckpt_path)
    with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
        json.dump(metrics, f, indent=2)
    save_frontier(collect(out_dir)[0], out_dir, reference)             # every run in out_dir, this one too
    print_frontier(curve, path, result)
    print_samples(result, name)
    print(f"seconds {metrics['seconds']}")
