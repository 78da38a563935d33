"""
ppo.py: align the GPT with the reward model by PPO. Step 4 of minibard (InstructGPT's RL step).

As the references do it (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022; Huang et
al., "The N Implementation Details of RLHF with PPO"); the reasons for each choice: docs/ppo.md.
 1. Rollouts: `batch_size` prompts (speech starts), a whole turn each from the current policy (to
    its blank line, or `max_answer_len` characters); padding after an answer's end is masked out.
 2. log pi and log pi_ref of the sampled characters at the sampling temperature, dropout off; the
    reference is the policy PPO starts from (`policy`: sft.pt, InstructGPT's eq. 2; or gpt.pt).
 3. Reward per token: r_t = -beta (log pi - log pi_ref), plus on each answer's last token the RM
    score in units of its std on the reference's answers (so beta means the same for any reward.pt),
    less `truncation_penalty` for a turn cut at max_answer_len (Huang et al.).
 4. beta adapted to `kl_target` nats (Ziegler et al.), fed the exact KL (point 8).
 5. Advantages: GAE (gamma 1, lambda 0.95) from the critic, whitened; or, with `advantage` rloo /
    grpo, a critic-free group baseline over `group_size` answers a prompt (Ahmadian et al. 2024;
    Shao et al. 2024); the KL stays in the reward for every method.
 6. PPO update: `update_epochs` x `num_minibatches`; clipped surrogate, clipped value loss, global
    grad-norm clip; optional entropy bonus and PPO-ptx (off).
 7. The critic: a trainable copy of the RM (InstructGPT), whose per-character head makes its
    running sum a value from the first iteration (class Critic).
 8. KL to the reference in nats per answer: k1, k3 (Schulman) at the sampled tokens, and exact.
 9. Evaluation on held-out prompts (frontier.py): best-of-n for n = 1, 2, 4, ..., best_of_max, and
    the policy every `eval_interval` iterations. Gold is only ever measured...
10. ...but on the verifiable-reward road (--reward=gold), where the labeler's gold is the reward, as
    a unit test or a math checker is for GRPO (Shao et al. 2024), critic-free: no proxy to game.
 Left out: reward whitening. Option names: cleanrl's, else TRL's (kl_target: not cleanrl's target_kl).

Run:  python ppo.py                   (after sft.py and reward.py; times and numbers: README)
      python ppo.py --advantage=rloo  (or grpo: the critic-free group baselines, beside PPO's files)
      python ppo.py --advantage=grpo --reward=gold --init_kl_coef=0 --kl_target=0   (TRL's GRPO)
Writes out/ppo.pt, ppo.json (eval and path), ppo_log.csv (rloo.*, ... for the others), and redraws
out/frontier.csv and .png from every run there.
"""
import copy
import csv
import json
import os
import re
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn as nn

from configurator import ByDevice, configure
from data import (END_OF_TURN, answer_mask, answer_sum, encode, ends_turn, forward_in_chunks, load_splits,
                  masked_mean, sample_prompts, turn_starts, whiten)
from frontier import (NOT_RUNS, RunPath, best_of_n_kept, eval_result, held_out_prompts, print_frontier,
                      rm_calibration)
from labeler import gold_scores
from model import (GPT, GPTConfig, answer_logits, exact_kl, load_policy_and_rm, log_probs, rm_scores,
                   token_logprobs)
from plumbing import die, eta, made_from, prepare_out_dir, refuse_to_replace, save_checkpoint, share_done

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
clip_coef = 0.2                 # in (0, inf): PPO ratio clip epsilon (TRL: cliprange)
cliprange_value = 0.2           # in (0, inf): value clip around the rollout's values (TRL's name)
vf_coef = 0.5                   # in [0, inf): value loss weight (separate nets: only via max_grad_norm)
ent_coef = 0.0                  # in [0, inf): entropy bonus (0: the KL penalty keeps entropy up)
ptx_coef = 0.0                  # in [0, inf): PPO-ptx weight of the LM loss (InstructGPT: 27.8)
gamma = 1.0                     # in [0, 1]: discount (short episodes, reward at the end)
gae_lambda = 0.95               # in [0, 1]: GAE lambda
advantage = 'gae'               # in {'gae', 'rloo', 'grpo'}: critic and GAE, or a group baseline (point 5)
reward = 'rm'                   # in {'rm', 'gold'}: the RM, or the labeler's gold as a checker (point 10)
run_name = 'auto'               # the run's files: out_dir/<this>.*; auto: ppo, rloo or grpo (+ _gold)
group_size = 4                  # in [2, inf): rloo / grpo: answers per prompt (batch_size / this prompts)
init_kl_coef = 0.5              # in [0, inf): beta at the start, for rewards of unit std (point 4)
kl_target = 3.5                 # in [0, inf): nats/answer the controller steers to (TRL: target); 0: fixed
kl_horizon = 5120               # in [1, inf): episodes for the controller to close the gap (TRL: horizon)
max_grad_norm = 1.0             # in (0, inf): global grad-norm clip of policy and critic
forward_batch_size = ByDevice(cpu=32, cuda=256)  # in [1, inf): sequences a no-grad forward (CPU: in cache)
eval_prompts = 256              # in [1, inf): held-out prompts for every reported number
eval_samples = 2                # in [1, inf): answers per held-out prompt at each PPO point
eval_interval = 8               # in [1, inf): evaluate the policy every this many iterations
best_of_max = 64                # in [16, inf): best-of-n for n = 1, 2, 4, ..., this (one pass)
allow_stale = False             # go on from checkpoints made from older ones than those there now
# ----------------------------------------------------------------------------------------


class Critic(nn.Module):
    """V(s_t) at each answer position t, from a trainable copy of the RM (point 7), which scores
    b + sum_k c_k, c_k = w . h_k a character. It starts as the score said so far, V(s_t) = gain (b +
    sum_{k<t} c_k), so GAE's TD errors are each character's own share, delta_t = gain c_t - beta kl_t,
    whatever the answer's length; the value loss then teaches it what the rest is worth."""
    def __init__(self, rm, gain=1.0):
        super().__init__()
        self.rm = copy.deepcopy(rm)
        self.register_buffer('gain', torch.tensor(float(gain)))  # the same scale as PPO's rewards

    def forward(self, seqs, prompt_len):
        c = self.rm.contributions(seqs, prompt_len)  # (B, Ta) each character's share
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
    last = mask.sum(1).long() - 1  # (B,) index of the last token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards, values, gamma, gae_lambda):
    """Generalised advantage estimation (Schulman et al. 2016), V after the last token = 0.

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lambda A_{t+1};  returns = A + V.
    Padding must have r = V = 0: then it adds nothing, and the last real token sees V = 0 after it."""
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
    """Critic-free advantages from G = group_size answers to each prompt, next to each other:
    returns (P G,) -> (P G,).

    RLOO (Ahmadian et al. 2024):  A_i = R_i - 1/(G-1) sum_{j != i} R_j   (the leave-one-out baseline)
    GRPO (Shao et al. 2024), scale: A_i = (R_i - mean_j R_j) / (std_j R_j + eps)"""
    R = returns.view(-1, group_size)  # (P, G)
    if scale:
        return ((R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + eps)).flatten()
    others = (R.sum(1, keepdim=True) - R) / (group_size - 1)  # mean of the other G - 1 returns
    return (R - others).flatten()


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
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)  # k3 of pi_old vs pi
    return pg_loss, v_loss, clipfrac, approx_kl


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over the answer tokens: 1 = a perfect critic, <= 0 = no better than a
    constant."""
    var = lambda x: masked_mean((x - masked_mean(x, mask)) ** 2, mask).item()
    return float('nan') if var(returns) == 0 else 1 - var(returns - values) / var(returns)


class AdaptiveKLController:
    """Ziegler et al. 2019, eq. (2): e = clip(KL/target - 1, -0.2, 0.2); beta *= 1 + e n / horizon."""
    def __init__(self, init_kl_coef, target, horizon):
        self.beta, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, kl, n_steps):
        if self.target > 0:  # target 0: fixed beta
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.beta *= 1 + error * n_steps / self.horizon
        return self.beta


@torch.no_grad()
def forward_rollout(policy, ref, critic, seqs, lengths, prompt_len, temperature, chunk):
    """No-grad passes over the rollout (B, Tp + Ta), in chunks: log pi, log pi_ref, V (0 without a
    critic), the exact per-token KL(pi || pi_ref) and pi's entropy, each (B, Ta)."""
    def passes(s, _):
        logits = answer_logits(policy(s)[0], prompt_len)  # (b, t, V)
        ref_logits = answer_logits(ref(s)[0], prompt_len)
        answer, logp_all = s[:, prompt_len:], log_probs(logits, temperature)
        return (token_logprobs(logits, answer, temperature),  # log pi(y_t | s_t)
                token_logprobs(ref_logits, answer, temperature),  # log pi_ref(y_t | s_t)
                critic(s, prompt_len) if critic else logits.new_zeros(logits.shape[:2]),  # V(s_t)
                exact_kl(logits, ref_logits, temperature),  # KL(pi || pi_ref) at s_t
                -(logp_all.exp() * logp_all).sum(-1))  # H(pi(.|s_t))
    return forward_in_chunks(passes, seqs, lengths, prompt_len, chunk)


LOG = {'reward': '.3f', 'gold': '.3f', 'kl': '.2f', 'kl_k1': '.2f', 'kl_k3': '.2f', 'beta': '.4f',  # an
       'length': '.0f', 'ended': '.2f', 'clipfrac': '.3f', 'approx_kl': '.4f', 'pg_loss': '.4f',  # iter's log
       'v_loss': '.4f', 'entropy': '.3f', 'explained_var': '.2f', 'time_ms': '.0f'}  # line, ppo_log.csv


def train(policy, ref, critic, reward_fn, get_prompts, stop, args, gold_fn=None, lm_batch_fn=None, log=print,
          on_iter=None):
    """The PPO loop. critic(seqs, Tp) -> V (B, Ta), or None for a group baseline; reward_fn(seqs (B,
    Tp + Ta), lengths (B,)) -> (B,); get_prompts(n) -> (n, Tp); args: this file's options (as cleanrl
    passes them). -> a dict an iteration. A NaN/inf loss raises FloatingPointError before the update."""
    Tp, chunk = args.prompt_len, args.forward_batch_size
    groups = [{'params': list(policy.parameters()), 'lr': args.learning_rate}]
    if critic is not None:
        groups.append({'params': list(critic.parameters()), 'lr': args.critic_lr})
    params = [p for g in groups for p in g['params']]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    kl_ctl = AdaptiveKLController(args.init_kl_coef, args.kl_target, args.kl_horizon)
    gen = torch.Generator(next(policy.parameters()).device).manual_seed(args.seed)
    shuffle = torch.Generator().manual_seed(args.seed)
    history, t_run = [], time.time()
    policy.eval()  # dropout off during RL
    if critic is not None:
        critic.eval()
    G = 1 if args.advantage == 'gae' else args.group_size
    for it in range(args.max_iters):
        t0 = time.time()
        # ---- rollout: sample a turn, then score every token under the policy, the reference and the RM
        prompts = get_prompts(args.batch_size // G).repeat_interleave(G, 0)  # (B, Tp): G answers a prompt
        seqs, _, lengths = policy.generate(prompts, args.max_answer_len, temperature=args.temperature,
                                           generator=gen, stop=stop)  # (B, Tp + Ta), (B,)
        mask = answer_mask(lengths, seqs.size(1) - Tp)  # (B, Ta) 1 up to each answer's end
        logp, ref_logp, values, kl_exact, entropy = forward_rollout(
            policy, ref, critic, seqs, lengths, Tp, args.temperature, chunk)  # (B, Ta) each
        values = values * mask  # V = 0 after the end (gae)
        scores = reward_fn(seqs, lengths)  # (B,)
        finished = ends_turn(seqs[:, Tp:], lengths, stop)  # (B,) did the speaker stop?
        scores = scores - args.truncation_penalty * (~finished).float()  # a fixed cost for running out
        beta = kl_ctl.beta
        rewards = per_token_rewards(scores, logp, ref_logp, beta, mask)  # (B, Ta)
        if args.advantage == 'gae':
            advantages, returns = gae(rewards, values, args.gamma, args.gae_lambda)
            advantages = whiten(advantages, mask)
        else:  # R_i = sum_t r_t; no critic: V = 0
            advantages = group_advantages(rewards.sum(1), G, args.advantage == 'grpo')[:, None] * mask
            returns = values
        k1, k3 = kl_estimates(logp, ref_logp)
        kl = answer_sum(kl_exact, mask)  # nats per answer
        kl_ctl.update(kl, args.batch_size)
        # ---- PPO update: epochs x shuffled minibatches of whole episodes
        B = seqs.size(0)
        stats = []
        for _ in range(args.update_epochs):
            for idx in torch.randperm(B, generator=shuffle).chunk(args.num_minibatches):  # ceil(B/n) each
                logits = answer_logits(policy(seqs[idx])[0], Tp)  # (mb, Ta, V)
                new_values = critic(seqs[idx], Tp) * mask[idx] if critic else values[idx]  # (mb, Ta)
                new_logp = token_logprobs(logits, seqs[idx, Tp:], args.temperature)
                pg_loss, v_loss, clipfrac, approx_kl = ppo_losses(
                    new_logp, logp[idx], advantages[idx], new_values, values[idx], returns[idx], mask[idx],
                    args.clip_coef, args.cliprange_value)
                loss = pg_loss + args.vf_coef * v_loss
                if args.ent_coef > 0:  # - c H(pi): a bonus for entropy
                    logp_all = log_probs(logits, args.temperature)
                    loss = loss + args.ent_coef * masked_mean((logp_all.exp() * logp_all).sum(-1), mask[idx])
                if args.ptx_coef > 0 and lm_batch_fn is not None:  # InstructGPT eq. 2: + gamma E[log pi(x)]
                    loss = loss + args.ptx_coef * policy(*lm_batch_fn())[1]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f'PPO loss is {loss.item()} at iter {it}')
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                opt.step()
                stats.append(torch.stack([pg_loss.detach(), v_loss.detach(), clipfrac, approx_kl]))
        pg, vl, cf, ak = torch.stack(stats).mean(0).tolist()
        row = {'iter': it + 1, 'reward': scores.mean().item(),
               'gold': gold_fn(seqs[:, Tp:], lengths).mean().item() if gold_fn else float('nan'),
               'kl': kl, 'kl_k1': answer_sum(k1, mask), 'kl_k3': answer_sum(k3, mask), 'beta': beta,
               'length': lengths.float().mean().item(), 'ended': finished.float().mean().item(),
               'clipfrac': cf, 'approx_kl': ak, 'pg_loss': pg, 'v_loss': vl,
               'entropy': masked_mean(entropy, mask).item(),
               'explained_var': explained_variance(values, returns, mask),
               'time_ms': (time.time() - t0) * 1000}
        history.append(row)
        numbers = ', '.join(f'{k} {row[k]:{f}}' for k, f in LOG.items())
        log(f'iter {share_done(it + 1, args.max_iters)}: {numbers}, {eta(it + 1, args.max_iters, t_run)}')
        if on_iter is not None:
            on_iter(it, row)
    return history


if __name__ == '__main__':
    config = configure(globals(), sys.argv[1:])  # each option against its rule, then:
    if num_minibatches > batch_size:
        die(f'--batch_size={batch_size} must be at least --num_minibatches={num_minibatches}')
    if advantage != 'gae' and batch_size % group_size:
        die(f'--batch_size={batch_size} must be a multiple of --group_size={group_size} ({advantage}: '
            'whole groups of answers to a prompt)')
    if reward == 'gold' and advantage == 'gae':
        die('--reward=gold runs critic-free, as verifiable-reward recipes do: add --advantage=grpo or rloo')
    name = run_name if run_name != 'auto' else advantage.replace('gae', 'ppo') + '_gold' * (reward == 'gold')
    taken = NOT_RUNS | {'preferences', 'expert_iteration', 'reference', 'best_of_16', 'best_of_n', 'prompts'}
    if not re.fullmatch(r'[\w.-]+', name) or name in taken or name.startswith(('dpo_beta', 'best_of_n_at')):
        die(f'--run_name={run_name!r} would name files of another stage, or no file: choose another')
    t_start = time.time()
    prepare_out_dir(out_dir, name)
    log_path, ckpt_path = os.path.join(out_dir, f'{name}_log.csv'), os.path.join(out_dir, f'{name}.pt')
    refuse_to_replace(ckpt_path, max_iters * batch_size, 'episodes')
    torch.manual_seed(seed)
    reference = config['reference'] = policy  # PPO's start, and its KL's reference
    parents = os.path.join(out_dir, reference), os.path.join(out_dir, 'reward.pt')
    ref, vocab, _, rm, rm_checkpoint = load_policy_and_rm(*parents, device, allow_stale)
    if rm_checkpoint.get('policy') != reference:  # whose answers the RM learnt from
        print(f"note: reward.pt learnt from answers of {rm_checkpoint.get('policy')}, not {reference}'s: "
              'for one road, give both stages the same --policy', file=sys.stderr)
    prompt_len = config['prompt_len'] = prompt_len or rm_checkpoint['prompt_len']
    max_answer_len = config['max_answer_len'] = max_answer_len or rm_checkpoint['max_answer_len']
    if prompt_len + max_answer_len > ref.config.block_size:
        die(f'prompt_len + max_answer_len = {prompt_len + max_answer_len} exceeds block_size '
            f'{ref.config.block_size}')
    train_data, val_data, _ = load_splits(data_path, vocab)
    stop = config['stop'] = encode(END_OF_TURN, vocab)
    ref.requires_grad_(False), rm.requires_grad_(False)  # frozen
    model = GPT(GPTConfig(**dict(ref.config.__dict__, dropout=0.0))).to(device)  # the policy PPO trains
    model.load_state_dict(ref.state_dict())
    prompt_gen, starts = torch.Generator().manual_seed(seed), turn_starts(train_data, vocab, prompt_len)
    get_prompts = lambda b: sample_prompts(train_data, starts, b, prompt_len, prompt_gen).to(device)
    T, ptx_windows = ref.config.block_size, -(-batch_size // num_minibatches)  # ptx: a minibatch's episodes

    def lm_batch():  # PPO-ptx: random windows of the training text and their next characters, (b, T) each
        ix = torch.randint(len(train_data) - T - 1, (ptx_windows,), generator=prompt_gen)
        x = torch.stack([train_data[i:i + T + 1] for i in ix]).to(device)  # (b, T + 1)
        return x[:, :-1], x[:, 1:]

    gold_fn = lambda y, n: gold_scores(y.cpu(), n.cpu(), vocab).to(y.device)  # (B,): measured, or the reward
    score = torch.no_grad()(lambda s, n: gold_fn(s[:, prompt_len:], n) if reward == 'gold' else
                            rm_scores(rm, s, prompt_len, n, forward_batch_size))
    with torch.no_grad():  # its std on 256 answers of the reference -> rewards of unit scale (Ziegler)
        seqs0, _, n0 = ref.generate(get_prompts(256), max_answer_len, temperature=temperature,
                                     generator=torch.Generator(device).manual_seed(seed), stop=stop)
        scores0 = gold_fn(seqs0[:, prompt_len:], n0) if reward == 'gold' else rm(seqs0, prompt_len, n0)
        gain = 1.0 / scores0.std().clamp_min(1e-6).item()
    critic = Critic(rm, gain).requires_grad_(True) if advantage == 'gae' else None  # a copy of the RM
    held_out = held_out_prompts(val_data, vocab, eval_prompts, prompt_len, seed, device)
    print(f'best-of-n, n = 1..{best_of_max}, on {eval_prompts} held-out prompts ...')
    curve, samples = best_of_n_kept(out_dir, reference, ref, rm, held_out, vocab, max_answer_len, stop,
                                    temperature, best_of_max, seed, forward_batch_size)
    path = RunPath(name, model, ref, rm, held_out, vocab, max_answer_len, stop, temperature, eval_samples,
                   seed, forward_batch_size)
    log_file = open(log_path + '.part', 'w', newline='')  # <name>_log.csv at the end: a stopped run
    writer = csv.DictWriter(log_file, fieldnames=['iter', *LOG])  # leaves the last run's log as it was
    writer.writeheader()

    def on_iter(it, row):  # one csv row per iteration, flushed so a killed run keeps what it logged
        writer.writerow(row)
        log_file.flush()
        if (it + 1) % eval_interval == 0 or it + 1 == max_iters:
            path.add(it + 1)

    groups = '' if advantage == 'gae' else f', {batch_size // group_size} prompts x {group_size} ({name})'
    print(f'{time.time() - t_start:.1f}s: PPO, {max_iters} iters x {batch_size} turns of <= {max_answer_len} '
          f'chars{groups}, device {device}; reward = {reward.upper()} x {gain:.2f} (1 / its std)')
    path.add(0)
    try:
        train(model, ref, critic, lambda s, n: gain * score(s, n), get_prompts, stop,
              SimpleNamespace(**config), gold_fn, lm_batch, on_iter=on_iter)
    except FloatingPointError as e:
        die(f'{e}: stopped; {ckpt_path} was not overwritten. Try a lower --learning_rate')
    log_file.close()
    result = eval_result(curve, path.rows[-1], samples, path.samples, held_out, vocab)
    calibration = {n: rm_calibration(m, rm, held_out[:64], vocab, max_answer_len, stop, temperature, 8, seed,
                                     rm_checkpoint['config']['tau'], forward_batch_size)
                   for n, m in ((reference, ref), (name, model))}  # is P still P off the RM's data?
    metrics = {'policy': reference, 'reference': reference, 'advantage': advantage, 'reward': reward,
               'seed': seed, 'eval_prompts': eval_prompts, 'iters': max_iters, 'calibration': calibration,
               'seconds': round(time.time() - t_start, 1), 'eval': result, 'path': path.rows}
    save_checkpoint({'model': model.state_dict(), 'critic': critic.state_dict() if critic else None,
                     'model_args': dict(model.config.__dict__), 'config': config, 'vocab': vocab,
                     'iter_num': max_iters, 'metrics': json.loads(json.dumps(metrics)),
                     'budget': max_iters * batch_size, 'made_from': made_from(*parents)}, ckpt_path)
    os.replace(log_path + '.part', log_path)
    path.save(out_dir, metrics, [f'{name}.json'])  # and the frontier of every run in out_dir, this one too
    print_frontier(curve, path.rows, result)
    print("the RM's P on 64 prompts x 8 answers, ece / prob_mae: " + ', '.join(
          f"{n}'s {c['ece']:.3f} / {c['prob_mae']:.3f}" for n, c in calibration.items()))
    print(f"seconds {metrics['seconds']}")
