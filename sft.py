"""
sft.py: supervised fine-tuning on the labeler's demonstrations. Step 2 of minibard (InstructGPT's step 1).

The recipe (InstructGPT, Ouyang et al. 2022, section 3.5), with the labellers who wrote
demonstrations replaced by labeler.py choosing them from human text:
 1. Demonstrations: every speech of the training text with prompt_len characters before it (the
    end of a speech, the blank line, the next speaker's name: reward.py's prompts). The answer is
    the turn, as everywhere: up to and including its blank line, or max_answer_len characters.
    The labeler keeps the turns it likes, those of gold score >= min_gold: choosing is the
    labeler's work, as its labels are; what trains reads the kept text, never g.
 2. Loss: cross-entropy on the answer characters only, the prompt masked (sft_loss):
    L = -1/N sum_b sum_{t < len_b} log pi(y_{b,t} | x_b, y_{b,<t}),  N = sum_b len_b.
 3. AdamW from out/gpt.pt, `batch_size` demonstrations a step, a constant lr after a short
    warmup. Early stopping: every `eval_interval` steps the loss on held-out demonstrations (the
    validation text's turns, chosen by the same rule) is measured; the lowest is kept, and the
    run stops after `patience` evaluations without a new lowest.
 4. Measured on the held-out prompts every later step uses (held_out_prompts): gold ± se, length,
    the share of answers that end on their own, and the exact KL to the pretrained model summed
    over each answer, from the full next-character distributions (as for PPO); the same for the
    pretrained model; and the copy rate: the share of answers that repeat copy_len or more
    characters of a training demonstration verbatim (a small set is easy to memorise).

Run:  python sft.py              (after python gpt.py; times and numbers: README)
      python sft.py --min_gold=2 (fewer, better-liked demonstrations)
Writes out/sft.pt (loadable wherever gpt.pt is) and out/sft.json (demos, val_loss, gold, gold_se,
gold_pretrained, kl_to_pretrained, copy_rate, seconds, ...).
"""
import copy
import math
import os
import sys
import time

import torch

from configurator import configure
from data import (END_OF_TURN, answer_mask, answer_texts, decode, encode, ends_turn, load_splits,
                  turn_starts)
from frontier import held_out_prompts, mean_se, measure_policy
from labeler import gold_score, gold_scores
from model import GPT, GPTConfig, answer_logits, load_gpt, token_logprobs
from plumbing import (die, eta, made_from, prepare_out_dir, refuse_to_replace, save_checkpoint, share_done,
                      write_json)

# ----------------------------------------------------------------------------------------
# hyperparameters (`--key=value` overrides any of them)
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', ...; sizes follow it
out_dir = 'out'                 # reads out_dir/gpt.pt, writes out_dir/sft.pt and sft.json
data_path = 'input.txt'
seed = 1337                     # in [0, inf): batches, and the held-out answers
prompt_len = 16                 # in [1, inf): as reward.py: the end of a speech, the speaker's name
max_answer_len = 96             # in [2, inf): as reward.py: a turn ends at its blank line or this long
min_gold = 1                    # in [-100, 100]: the labeler keeps turns it scores at least this
batch_size = 32                 # in [1, inf): demonstrations a step
learning_rate = 2e-4            # in (0, inf): AdamW, peak; each step moves away from the pretrained model
dropout = 0.0                   # in [0, 1): SFT's own (the recipe was tuned at 0), whatever gpt.pt's was
warmup_iters = 10               # in [0, inf): linear warmup
min_lr_ratio = 0.0              # in [0, 1]: then linear decay to lr * this at max_iters (1: constant)
weight_decay = 0.0              # in [0, inf): on matrices
grad_clip = 1.0                 # in [0, inf): clip the global grad norm (0 = off)
max_iters = 200                 # in [1, inf): steps (the lr schedule's length); early stopping may end sooner
eval_interval = 25              # in [1, inf): held-out demonstration loss every this many steps
patience = 4                    # in [1, inf): stop after this many evaluations without a new best
eval_prompts = 256              # in [1, inf): held-out prompts for the gold and KL measurements
eval_samples = 4                # in [1, inf): answers per held-out prompt
temperature = 1.0               # in (0, inf): of the measured answers and of the KL
copy_len = 32                   # in [1, inf): characters in a row that count as copying a demonstration
log_interval = 25               # in [1, inf)
# ----------------------------------------------------------------------------------------

def demonstrations(data, vocab, prompt_len, max_len, min_gold):
    """The labeler's demonstrations from a text (1-D tokens): every turn with a prompt_len prompt
    before it, up to and including its blank line or max_len characters, kept where the gold
    score is >= min_gold. -> seqs (N, prompt_len + Ta) prompt and answer, padded after the
    answer's end, and answer lengths (N,)."""
    text, stop = decode(data, vocab), END_OF_TURN
    rows = []
    for s in turn_starts(data, vocab, prompt_len).tolist():
        end = text.find(stop, s)
        n = min(max_len, (end + len(stop) if end >= 0 else len(text)) - s)  # the turn, or max_len
        if gold_score(text[s:s + n]) >= min_gold:
            rows.append((s, n))
    if not rows:
        return torch.zeros(0, prompt_len + 1, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    lengths = torch.tensor([n for _, n in rows])
    seqs = torch.zeros(len(rows), prompt_len + int(lengths.max()), dtype=torch.long)  # 0 after the end
    for row, (s, n) in enumerate(rows):
        seqs[row, :prompt_len + n] = data[s - prompt_len:s + n]
    return seqs, lengths


def sft_loss(model, seqs, lengths, prompt_len):
    """Cross-entropy on the answer characters only: seqs (B, Tp + Ta), lengths (B,) -> scalar.
    L = -1/N sum_b sum_{t < len_b} log pi(y_{b,t} | prompt, y_{b,<t}), N = sum_b len_b (a mean over
    answer characters: the prompt and the padding after each answer count for nothing)."""
    logp = token_logprobs(answer_logits(model(seqs)[0], prompt_len), seqs[:, prompt_len:])  # (B, Ta)
    mask = answer_mask(lengths, logp.size(1))  # (B, Ta)
    return -(logp * mask).sum() / mask.sum()


@torch.no_grad()
def demo_loss(model, seqs, lengths, prompt_len, batch=256):
    """sft_loss over a whole set of demonstrations, a mean over all their answer characters."""
    total = sum(sft_loss(model, s, n, prompt_len).item() * n.sum().item()
                for s, n in zip(seqs.split(batch), lengths.split(batch)))
    return total / lengths.sum().item()


def copy_rate(texts, demos, n):
    """The share of texts that contain a run of n characters found verbatim in one of `demos`."""
    seen = {d[i:i + n] for d in demos for i in range(len(d) - n + 1)}
    return sum(any(t[i:i + n] in seen for i in range(len(t) - n + 1)) for t in texts) / max(len(texts), 1)


# ------------------------------------------------------------------ fine-tuning
if __name__ == '__main__':
    config = configure(globals(), sys.argv[1:])  # each option against its rule, then:
    t_start = time.time()
    prepare_out_dir(out_dir, 'sft')
    refuse_to_replace(os.path.join(out_dir, 'sft.pt'), max_iters * batch_size, 'demonstrations')
    torch.manual_seed(seed)
    gpt_path = os.path.join(out_dir, 'gpt.pt')
    pretrained, vocab, gpt_checkpoint = load_gpt(gpt_path, device=device)
    if prompt_len + max_answer_len > pretrained.config.block_size:
        die(f'prompt_len + max_answer_len = {prompt_len + max_answer_len} exceeds the GPT block_size '
            f'{pretrained.config.block_size}: lower them')
    train_data, val_data, _ = load_splits(data_path, vocab)
    stop = encode(END_OF_TURN, vocab)
    demos, demo_lengths = demonstrations(train_data, vocab, prompt_len, max_answer_len, min_gold)
    val_demos, val_lengths = demonstrations(val_data, vocab, prompt_len, max_answer_len, min_gold)
    if len(demos) == 0 or len(val_demos) == 0:
        die(f'--min_gold={min_gold} keeps {len(demos)} training and {len(val_demos)} held-out turns: '
            'lower it')
    answers = demos[:, prompt_len:]
    demo_texts = answer_texts(answers, demo_lengths, vocab)  # for the copy rate
    print(f'{len(demos)} demonstrations (gold >= {min_gold}) of the training text, {len(val_demos)} held '
          f'out: {demo_lengths.float().mean():.0f} characters on average, '
          f'{ends_turn(answers, demo_lengths, stop).float().mean():.0%} end on their own, '
          f'gold mean {gold_scores(answers, demo_lengths, vocab).mean():.2f}')

    model_args = dict(gpt_checkpoint['model_args'], dropout=dropout)  # the policy; pretrained stays as is
    model = GPT(GPTConfig(**model_args)).to(device).train()
    model.load_state_dict(pretrained.state_dict())
    optimizer = model.configure_optimizers(weight_decay, lr=learning_rate)  # gpt.py's decay rule
    gen = torch.Generator().manual_seed(seed)  # batches
    demos, demo_lengths, val_demos, val_lengths = (t.to(device) for t in (demos, demo_lengths, val_demos,
                                                                          val_lengths))
    pretrained_loss = demo_loss(pretrained, val_demos, val_lengths, prompt_len)
    best = (pretrained_loss, 0, copy.deepcopy(model.state_dict()))  # (loss, step, state) of the lowest so far
    print(f'step 0: held-out demonstration loss {pretrained_loss:.4f} (the pretrained model)')
    since_best, t0, it, run_loss = 0, time.time(), 0, None
    while it < max_iters and since_best < patience:
        ratio = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))  # linear warmup, then
        for group in optimizer.param_groups:  # linear decay to lr * min_lr_ratio at max_iters
            group['lr'] = learning_rate * (it + 1) / warmup_iters if it < warmup_iters else \
                learning_rate * min_lr_ratio + (1 - ratio) * (learning_rate - learning_rate * min_lr_ratio)
        b = torch.randint(len(demos), (batch_size,), generator=gen).to(device)
        n = demo_lengths[b]
        loss = sft_loss(model, demos[b, :prompt_len + int(n.max())], n, prompt_len)  # cut to the longest
        if not math.isfinite(loss.item()):
            die(f'loss is {loss.item()} at step {it}: try a lower --learning_rate; {out_dir}/sft.pt was not '
                'written')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        it += 1
        run_loss = loss.item() if run_loss is None else 0.9 * run_loss + 0.1 * loss.item()
        if it % log_interval == 0:
            print(f'iter {share_done(it, max_iters)}: loss {run_loss:.4f}, {eta(it, max_iters, t0)} at most')
        if it % eval_interval == 0 or it == max_iters:  # early stopping on the held-out demonstrations
            model.eval()
            val_loss = demo_loss(model, val_demos, val_lengths, prompt_len)
            model.train()
            if not math.isfinite(val_loss):
                die(f'held-out loss is {val_loss} at step {it}: training diverged; try a lower '
                    '--learning_rate; '
                    f'{out_dir}/sft.pt was not written')
            since_best = 0 if val_loss < best[0] else since_best + 1
            if since_best == 0:
                best = (val_loss, it, copy.deepcopy(model.state_dict()))
            note = (' (best)' if since_best == 0 else
                    f' (best {best[0]:.4f} at step {best[1]}, {since_best}/{patience} without a better one)')
            print(f'step {it}: held-out demonstration loss {val_loss:.4f}{note}')
    model.load_state_dict(best[2])
    model.eval()
    train_seconds = time.time() - t_start
    if best[1] == 0:
        print(f"note: no step lowered the pretrained model's held-out loss ({pretrained_loss:.4f}): sft.pt "
              'is the pretrained model; a lower --learning_rate may help', file=sys.stderr)

    # the SFT model and the pretrained one on the held-out prompts every later step measures on
    prompts = held_out_prompts(val_data, vocab, eval_prompts, prompt_len, seed, device)
    rows = {}
    for name, policy in (('pretrained', pretrained), ('sft', model)):
        seqs, lengths, values = measure_policy(policy, pretrained, prompts, vocab, max_answer_len, stop,
                                               temperature, eval_samples, seed, log=print)
        per_prompt = {k: v.view(eval_prompts, eval_samples).mean(1) for k, v in values.items()}
        texts = answer_texts(seqs[:, prompt_len:], lengths, vocab)
        rows[name] = {**dict(zip(('gold', 'gold_se'), mean_se(per_prompt['gold']))),
                      **{k: per_prompt[k].mean().item() for k in ('length', 'ended', 'kl')},
                      'copy_rate': copy_rate(texts, demo_texts, copy_len),
                      'samples': texts[:3 * eval_samples:eval_samples]}  # the first answer to 3 prompts
    sft, pre = rows['sft'], rows['pretrained']
    metrics = {'demos': len(demos), 'val_demos': len(val_demos), 'min_gold': min_gold, 'best_step': best[1],
               'steps': it, 'val_loss': best[0],
               'val_loss_pretrained': pretrained_loss,
               'gold': sft['gold'], 'gold_se': sft['gold_se'], 'gold_pretrained': pre['gold'],
               'gold_pretrained_se': pre['gold_se'], 'kl_to_pretrained': sft['kl'], 'length': sft['length'],
               'ended': sft['ended'], 'length_pretrained': pre['length'], 'ended_pretrained': pre['ended'],
               'copy_rate': sft['copy_rate'], 'copy_rate_pretrained': pre['copy_rate'],
               'eval_prompts': eval_prompts, 'train_seconds': round(train_seconds, 1),
               'seconds': round(time.time() - t_start, 1)}
    save_checkpoint({'model': model.state_dict(), 'model_args': model_args, 'config': config, 'vocab': vocab,
                     'iter_num': best[1], 'metrics': metrics, 'budget': best[1] * batch_size,
                     'made_from': made_from(gpt_path)}, os.path.join(out_dir, 'sft.pt'))
    write_json({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
               os.path.join(out_dir, 'sft.json'))
    print('-' * 72 + f"\n{eval_prompts} held-out prompts x {eval_samples} answers:\n"
          f"{'':12}{'gold':>7}{'± se':>7}{'KL to pretrained':>18}{'length':>8}{'ended':>7}{'copies':>8}")
    for name, row in rows.items():
        print(f"{name:12}{row['gold']:7.3f}{row['gold_se']:7.3f}{row['kl']:18.2f}{row['length']:8.1f}"
              f"{row['ended']:7.2f}{row['copy_rate']:8.3f}")
    print(f"gold gained by SFT: {sft['gold'] - pre['gold']:+.3f} at an exact KL of {sft['kl']:.2f} nats "
          f"(best held-out demonstration loss {best[0]:.4f} at step {best[1]} of {it}; pretrained "
          f"{metrics['val_loss_pretrained']:.4f}); copies: answers with {copy_len}+ characters of a "
          'demonstration')
    for i, (a, b) in enumerate(zip(pre['samples'], sft['samples'])):
        print(f'\n--- prompt {i}: {decode(prompts[i], vocab)!r}\n  pretrained: {a!r}\n         sft: {b!r}')
    print(f"seconds {metrics['seconds']}")
