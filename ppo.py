"""
ppo.py: align the GPT with the reward model by PPO. Step 3 of minibard (InstructGPT's RL step).

The algorithm, as the references do it (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et
al. 2022; Huang et al., "The N Implementation Details of RLHF with PPO"):
 1. On-policy rollouts: `batch_size` prompts (windows of the training text), one response of
    `response_len` characters each, sampled from the current policy with the KV-cache generate.
 2. Log-probabilities of the sampled characters under the policy and the frozen reference
    (the pretrained GPT) are computed at the sampling temperature, with dropout off.
 3. Reward per token: r_t = -beta (log pi(y_t|s_t) - log pi_ref(y_t|s_t)), and the frozen
    reward model's score is added on the last response token, scaled to unit std on base-policy
    answers (Ziegler et al. normalise the RM so; ours is already centred there). How far the RM
    spreads answers depends on how well it trained, so without the gain the same beta meant a
    3x different KL pressure from one reward.pt to the next.
 4. beta is adapted (Ziegler et al.): e = clip(KL / target - 1, -0.2, 0.2),
    beta <- beta (1 + e n / horizon), n = episodes per iteration; fixed when kl_target = 0.
    The controller is fed the exact KL (below): same mean as the sampled estimate, less noise.
 5. Advantages by GAE (gamma 1, lambda 0.95) from the critic (7), returns = advantages + values;
    advantages are whitened over the rollout batch.
 6. PPO update: `ppo_epochs` passes over `num_minibatches` shuffled minibatches; clipped
    surrogate (clip 0.2), clipped value loss (0.2), global grad-norm clip; optional entropy
    bonus and optional PPO-ptx (LM loss on input.txt, InstructGPT eq. 2; off by default).
 7. The value function is a separate critic initialised from the reward model (as in
    InstructGPT). Our RM sums a per-token head over the answer, so its running sum
    V(s_t) = b + sum_{k<t} c_k + (Tr - t) c_bar (the score so far plus the expected rest) is a
    good value from the first iteration: GAE's TD errors then give every character its own
    share of the final score, delta_t = c_t - c_bar - beta kl_t, where a fresh value head passes
    lambda^(T-1-t) of it (0.95^63 = 0.04 to the first character). The critic is then trained
    with the clipped value loss.
 8. KL to the reference, logged three ways per iteration (nats per sequence): k1 = sum_t
    log(pi/pi_ref) at the sampled tokens, k3 = sum_t (ratio - 1) - log ratio with ratio =
    pi_ref/pi (Schulman's estimator, never negative), and the exact sum_t KL(pi(.|s_t) ||
    pi_ref(.|s_t)) over all 65 characters.
 Left out: per-batch reward whitening (scores are centred and scaled on base answers), padding and EOS
 handling (every response has exactly response_len characters).

Run:  python ppo.py             (after gpt.py and reward.py; CPU: ~1 min on 2 cores)
Writes out/ppo.pt, out/ppo.json (iters, seconds, eval: base / best_of_16 / ppo), out/ppo_log.csv.
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

from gpt import (GPT, GPTConfig, configure, decode, die, load_model, load_splits, prepare_out_dir, save_checkpoint,
                 token_logprobs)
from reward import best_of_n, gold_scores, load_reward_model, sample_prompts, sample_responses, score_answers

# ----------------------------------------------------------------------------------------
# hyperparameters (`--key=value` overrides any of them)
_gpu = torch.cuda.is_available()
device = 'cuda' if _gpu else 'cpu'
out_dir = 'out'                 # reads gpt.pt and reward.pt, writes ppo.pt, ppo.json, ppo_log.csv
data_path = 'input.txt'
seed = 1337
max_iters = 28                  # PPO iterations (rollout + update); KL grows ~0.13-0.17 nats/iter here
batch_size = 64                 # episodes (prompts) per iteration
prompt_len = None               # None: as out/reward.pt was trained (the RM knows only that shape)
response_len = None             # None: as out/reward.pt was trained
temperature = 1.0               # sampling and log-prob temperature (must be the same: Huang et al.)
ppo_epochs = 2                  # passes over each rollout
num_minibatches = 2             # minibatches per pass
learning_rate = 3e-4            # AdamW, constant, policy
critic_lr = 1e-5                # the critic: its value is a sum over 64 characters, so small steps
clip_coef = 0.2                 # PPO ratio clip epsilon
vf_clip = 0.2                   # value clip around the rollout's values
vf_coef = 0.5                   # value loss weight (separate networks: it matters only via grad_clip)
ent_coef = 0.0                  # entropy bonus (0: the KL penalty already keeps entropy up)
ptx_coef = 0.0                  # PPO-ptx: weight of the pretraining LM loss (InstructGPT: 27.8)
gamma = 1.0                     # discount: episodes are short and the reward comes at the end
lam = 0.95                      # GAE lambda
init_beta = 1.0                 # initial KL coefficient, for rewards of unit std (see point 3); at 0.6
                                # the policy found a 'good good good' mode and ran to 15 nats, at 1.3 it
                                # stayed under 2.1 nats with little gain
kl_target = 6.0                 # nats per sequence; 0 = fixed beta
kl_horizon = 10000              # episodes for the controller to close the gap
grad_clip = 1.0
forward_batch_size = 256        # sequences per no-grad forward over the rollout (memory bound)
eval_prompts = 128              # held-out prompts for the base / best-of-16 / PPO comparison
best_of = 16
# ----------------------------------------------------------------------------------------


class Critic(nn.Module):
    """V(s_t) for t = 0..Tr-1, from a trainable copy of the reward model (see point 7 above).

    The RM scores b + sum_k c_k, c_k = w . h_k per character. The value of a half-said answer is
    what it has scored so far plus what the rest is expected to add: V(s_t) = b + sum_{k<t} c_k +
    (Tr - t) c_bar, with c_bar = -b / Tr the mean share per character of a base answer (whose
    score is 0 after normalisation). Then V(s_0) = 0 and delta_t = c_t - c_bar - beta kl_t."""
    def __init__(self, rm, response_len, gain=1.0):
        super().__init__()
        self.rm = copy.deepcopy(rm)
        self.c_bar = nn.Parameter(-rm.bias.detach().clone() / response_len)
        self.register_buffer('gain', torch.tensor(float(gain)))     # the same scale as PPO's rewards

    def forward(self, seqs, prompt_len):
        c = self.rm.contributions(seqs, seqs.size(1) - prompt_len)  # (B, Tr) each character's share
        to_come = torch.arange(c.size(1), 0, -1, device=c.device)   # Tr - t characters still to say
        return self.gain * (self.rm.bias + torch.cumsum(c, 1) - c + to_come * self.c_bar)  # (B, Tr)


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


def per_token_rewards(scores, logp, ref_logp, beta):
    """r_t = -beta (log pi - log pi_ref) at every token, plus the RM score on the last. (B,), (B, T) -> (B, T)."""
    rewards = -beta * (logp - ref_logp)
    rewards[:, -1] += scores
    return rewards


def gae(rewards, values, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016), V after the last token = 0.

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  returns = A + V."""
    T = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages[:, t] = lastgaelam
    return advantages, advantages + values


def whiten(x, eps=1e-8):
    return (x - x.mean()) / (x.std() + eps)


def ppo_losses(logp, old_logp, advantages, values, old_values, returns, clip_coef, vf_clip):
    """The clipped PPO objectives (Schulman et al. 2017), all (B, T) in, scalars out.

    ratio = pi/pi_old;  pg_loss = E[max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))]
    v_loss = 1/2 E[max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)]"""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    v_clipped = old_values + (values - old_values).clamp(-vf_clip, vf_clip)
    v_loss = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2).mean()
    with torch.no_grad():
        clipfrac = ((ratio - 1).abs() > clip_coef).float().mean()
        approx_kl = ((ratio - 1) - log_ratio).mean()                 # k3 of pi_old vs pi
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


LOG_FIELDS = ['iter', 'score', 'gold', 'kl', 'kl_k1', 'kl_k3', 'beta', 'clipfrac', 'approx_kl', 'pg_loss',
              'v_loss', 'entropy', 'explained_var', 'time_ms']


def train(policy, ref, critic, reward_fn, get_prompts, cfg, gold_fn=None, lm_batch_fn=None, log=print, on_iter=None):
    """The PPO loop. policy, ref: GPTs; critic(seqs, Tp) -> V (B, Tr); reward_fn(seqs (B, T)) -> scores (B,);
    get_prompts(n) -> (n, prompt_len) tokens.

    cfg: this file's hyperparameters as a dict. Returns the per-iteration log (list of dicts).
    A NaN/inf loss raises FloatingPointError before the update, so nothing bad gets saved."""
    Tp, Tr, temp = cfg['prompt_len'], cfg['response_len'], cfg['temperature']
    params = list(policy.parameters()) + list(critic.parameters())
    opt = torch.optim.AdamW([{'params': policy.parameters(), 'lr': cfg['learning_rate']},
                             {'params': critic.parameters(), 'lr': cfg['critic_lr']}], weight_decay=0.0)
    kl_ctl = AdaptiveKLController(cfg['init_beta'], cfg['kl_target'], cfg['kl_horizon'])
    gen = torch.Generator(next(policy.parameters()).device).manual_seed(cfg['seed'])
    shuffle = torch.Generator().manual_seed(cfg['seed'])
    history = []
    policy.eval(), critic.eval()                                      # dropout off during RL
    for it in range(cfg['max_iters']):
        t0 = time.time()
        # ---- rollout: sample, then score every token under the policy, the reference and the RM
        prompts = get_prompts(cfg['batch_size'])                     # (B, Tp)
        seqs = policy.generate(prompts, Tr, temperature=temp, generator=gen)  # (B, Tp + Tr)
        logp, ref_logp, values, kl_exact, entropy = forward_rollout(policy, ref, critic, seqs, Tp, temp,
                                                                    cfg['forward_batch_size'])
        scores = torch.cat([reward_fn(s) for s in seqs.split(cfg['forward_batch_size'])])  # (B,) score of y given x
        beta = kl_ctl.beta
        rewards = per_token_rewards(scores, logp, ref_logp, beta)   # (B, Tr)
        advantages, returns = gae(rewards, values, cfg['gamma'], cfg['lam'])
        advantages = whiten(advantages)
        k1, k3 = kl_estimates(logp, ref_logp)
        kl = kl_exact.sum(1).mean().item()                           # nats per sequence
        kl_ctl.update(kl, cfg['batch_size'])
        # ---- PPO update: epochs x shuffled minibatches of whole episodes
        B, mb = seqs.size(0), seqs.size(0) // cfg['num_minibatches']
        stats = []
        for _ in range(cfg['ppo_epochs']):
            for idx in torch.randperm(B, generator=shuffle).split(mb):
                logits = response_logits(policy(seqs[idx])[0], Tp)        # (mb, Tr, V)
                new_values = critic(seqs[idx], Tp)                          # (mb, Tr)
                new_logp = token_logprobs(logits, seqs[idx, Tp:], temp)
                pg_loss, v_loss, clipfrac, approx_kl = ppo_losses(
                    new_logp, logp[idx], advantages[idx], new_values, values[idx], returns[idx],
                    cfg['clip_coef'], cfg['vf_clip'])
                loss = pg_loss + cfg['vf_coef'] * v_loss
                if cfg['ent_coef'] > 0:                              # - c H(pi): a bonus for entropy
                    logp_all = F.log_softmax(logits.float() / temp, -1)
                    loss = loss + cfg['ent_coef'] * (logp_all.exp() * logp_all).sum(-1).mean()
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
        y = seqs[:, Tp:]
        row = {'iter': it, 'score': scores.mean().item(), 'gold': gold_fn(y).mean().item() if gold_fn else float('nan'),
               'kl': kl, 'kl_k1': k1.sum(1).mean().item(), 'kl_k3': k3.sum(1).mean().item(), 'beta': beta,
               'clipfrac': cf, 'approx_kl': ak, 'pg_loss': pg, 'v_loss': vl,
               'entropy': entropy.mean().item(), 'explained_var': explained_variance(values, returns),
               'time_ms': (time.time() - t0) * 1000}
        history.append(row)
        log(f"iter {it}: score {row['score']:.3f}, gold {row['gold']:.3f}, kl {kl:.2f} (k1 {row['kl_k1']:.2f}, "
            f"k3 {row['kl_k3']:.2f}), beta {beta:.4f}, clipfrac {cf:.3f}, approx_kl {ak:.4f}, pg_loss {pg:.4f}, "
            f"v_loss {vl:.4f}, entropy {row['entropy']:.3f}, explained_var {row['explained_var']:.2f}, "
            f"time {row['time_ms']:.0f} ms")
        if on_iter is not None:
            on_iter(it, row)
    return history


def explained_variance(values, returns):
    """1 - Var(R - V) / Var(R): 1 = the critic predicts returns perfectly, <= 0 = no better than a constant."""
    var = returns.var().item()
    return float('nan') if var == 0 else 1 - (returns - values).var().item() / var


@torch.no_grad()
def evaluate(policy_gpt, base, rm, prompts, vocab, response_len, temperature=1.0, n_best=16, seed=0, chunk=256):
    """Three ways to answer the same held-out prompts (P, Tp): base, best-of-n (RM reranking of n base
    samples) and the PPO policy. gold / rm / prob = sigmoid(rm) means, and kl in nats to the base:
    exact for base (0) and ppo, the bound log n - (n-1)/n for best-of-n (Gao et al. 2022)."""
    gen = torch.Generator(prompts.device).manual_seed(seed)
    Tp, P = prompts.size(1), prompts.size(0)
    bon_y, bon_r, base_y, base_r = best_of_n(base, rm, prompts, n_best, response_len, temperature, gen, chunk)
    ppo_y, _ = sample_responses(policy_gpt, prompts, response_len, temperature, gen, chunk)
    seqs = torch.cat([prompts, ppo_y], 1)
    kl = torch.cat([exact_kl(response_logits(policy_gpt(s)[0], Tp), response_logits(base(s)[0], Tp), temperature).sum(1)
                    for s in seqs.split(chunk)])                      # (P,) nats per answer
    answers = {'base': (base_y[:, 0], base_r[:, 0], 0.0),             # the first of the n base samples
               f'best_of_{n_best}': (bon_y, bon_r, math.log(n_best) - (n_best - 1) / n_best),
               'ppo': (ppo_y, score_answers(rm, prompts, ppo_y, chunk), kl.mean().item())}
    result = {}
    for name, (y, r, k) in answers.items():
        result[name] = {'gold': gold_scores(y.cpu(), vocab).mean().item(), 'rm': r.mean().item(),
                        'prob': torch.sigmoid(r).mean().item(), 'kl': k,
                        'samples': [decode(y[i], vocab) for i in range(min(3, P))]}
    result['prompts'] = [decode(prompts[i], vocab) for i in range(min(3, P))]
    return result


def held_out_prompts(val_data, n, prompt_len, seed, device):
    """The evaluation prompts: n windows of the validation text, the same for ppo.py and sample.py."""
    return sample_prompts(val_data, n, prompt_len, torch.Generator().manual_seed(seed + 1)).to(device)


def print_eval(result):
    names = [k for k in result if k != 'prompts']
    print(f"{'policy':<12} {'gold':>7} {'rm':>7} {'prob':>7} {'kl':>7}")
    for name in names:
        r = result[name]
        print(f"{name:<12} {r['gold']:7.3f} {r['rm']:7.3f} {r['prob']:7.3f} {r['kl']:7.2f}")
    for i, p in enumerate(result['prompts']):
        print(f'\n--- prompt {i}: {p!r}')
        for name in names:
            print(f"{name:>12}: {result[name]['samples'][i]!r}")


if __name__ == '__main__':
    config = configure(globals(), sys.argv[1:])
    t_start = time.time()
    prepare_out_dir(out_dir)
    torch.manual_seed(seed)
    base, vocab, gpt_ckpt = load_model(os.path.join(out_dir, 'gpt.pt'), device=device)
    rm, rm_vocab, rm_ckpt = load_reward_model(os.path.join(out_dir, 'reward.pt'), device=device)
    if rm_vocab != vocab or {**rm_ckpt['model_args'], 'dropout': 0} != {**gpt_ckpt['model_args'], 'dropout': 0}:
        die(f'{out_dir}/reward.pt was not trained from this {out_dir}/gpt.pt (other vocabulary or shape): '
            f'run python reward.py again')
    prompt_len = config['prompt_len'] = prompt_len or rm_ckpt['prompt_len']
    response_len = config['response_len'] = response_len or rm_ckpt['response_len']
    if prompt_len + response_len > base.config.block_size:
        die(f'prompt_len + response_len = {prompt_len + response_len} exceeds block_size {base.config.block_size}')
    train_data, val_data, _ = load_splits(data_path, vocab)
    for p in list(base.parameters()) + list(rm.parameters()):
        p.requires_grad_(False)                                       # frozen reference and RM
    policy = GPT(GPTConfig(**dict(base.config.__dict__, dropout=0.0))).to(device)
    policy.load_state_dict(base.state_dict())
    prompt_gen = torch.Generator().manual_seed(seed)
    get_prompts = lambda b: sample_prompts(train_data, b, prompt_len, prompt_gen).to(device)
    block = base.config.block_size

    def lm_batch():  # pretraining batches for PPO-ptx: windows of block + 1, inputs and next characters
        w = sample_prompts(train_data, batch_size, block + 1, prompt_gen).to(device)
        return w[:, :-1], w[:, 1:]

    log_path, ckpt_path = os.path.join(out_dir, 'ppo_log.csv'), os.path.join(out_dir, 'ppo.pt')
    log_file = open(log_path, 'w', newline='')
    writer = csv.DictWriter(log_file, fieldnames=LOG_FIELDS)
    writer.writeheader()

    def on_iter(it, row):  # one csv row per iteration, flushed so a killed run keeps its log
        writer.writerow(row)
        log_file.flush()

    def ckpt(extra):
        save_checkpoint({'model': policy.state_dict(), 'critic': critic.state_dict(),
                         'model_args': dict(policy.config.__dict__), 'config': config, 'vocab': vocab,
                         **extra}, ckpt_path)

    with torch.no_grad():  # the RM's std on base answers -> rewards of unit scale (Ziegler et al.)
        seqs0 = base.generate(get_prompts(forward_batch_size), response_len, temperature=temperature,
                              generator=torch.Generator(device).manual_seed(seed))
        gain = 1.0 / rm(seqs0, response_len).std().clamp_min(1e-6).item()
    critic = Critic(rm, response_len, gain).requires_grad_(True)      # a trainable copy of the frozen RM
    print(f'PPO: {max_iters} iters x {batch_size} episodes of {response_len} chars, device {device}; '
          f'RM std on base answers {1 / gain:.4f}, so score = RM x {gain:.2f}')
    try:
        history = train(policy, base, critic, lambda s: gain * rm(s, response_len), get_prompts, config, gold_fn=lambda y: gold_scores(y.cpu(), vocab),
                        lm_batch_fn=lm_batch, on_iter=on_iter)
    except FloatingPointError as e:
        die(f'{e}: stopped; {ckpt_path} was not overwritten. Try a lower --learning_rate')
    log_file.close()
    train_seconds = time.time() - t_start
    result = evaluate(policy, base, rm, held_out_prompts(val_data, eval_prompts, prompt_len, seed, device),
                      vocab, response_len, temperature, best_of, seed)
    metrics = {'iters': max_iters, 'seconds': round(time.time() - t_start, 1),
               'train_seconds': round(train_seconds, 1), 'eval': result}
    ckpt({'iter_num': max_iters, 'metrics': json.loads(json.dumps(metrics))})
    with open(os.path.join(out_dir, 'ppo.json'), 'w') as f:
        json.dump(metrics, f, indent=2)
    print_eval(result)
    print(f"seconds {metrics['seconds']}")
    try:  # a picture of the run, only if matplotlib happens to be installed
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
        ax[0].plot([r['score'] for r in history], label='rm score')
        ax[0].plot([r['gold'] for r in history], label='gold')
        ax[1].plot([r['kl'] for r in history], label='exact KL (nats)')
        for a in ax:
            a.set_xlabel('iter'); a.legend()
        fig.tight_layout(); fig.savefig(os.path.join(out_dir, 'ppo.png'))
    except ImportError:
        pass
