"""
gpt.py: pretrain a character-level GPT on Tiny Shakespeare. Step 1 of minibard (nanoGPT's train.py).

Random windows of the training text, AdamW, warmup then cosine or linear decay, bf16 autocast on
CUDA, gradient accumulation, one process or N under torchrun (DDP), resume. Writes out/gpt.pt (the
best val loss) and out/gpt.json.

Run:  python gpt.py                  (a CUDA machine gets the GPU sizes; times and numbers: README)
      python gpt.py --init_from=resume --max_iters=8000  (continue: optimizer, iter, data order)
      torchrun --standalone --nproc_per_node=8 gpt.py    (one micro-batch a process and step)
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import ByDevice, configure
from data import decode, encode, load_splits
from model import GPT, GPTConfig, load_gpt
from plumbing import (MinibardError, die, eta, load_checkpoint, load_weights, prepare_out_dir,
                      refuse_to_replace, save_checkpoint, share_done, write_json)

# ----------------------------------------------------------------------------------------
# hyperparameters (`--key=value` overrides any of them)
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', 'cuda:1', ...; sizes follow it
out_dir = 'out'                 # where checkpoints and metrics go
data_path = 'input.txt'         # Tiny Shakespeare; the first 90% train
init_from = 'scratch'           # in {'scratch', 'resume'}: resume continues from out_dir/gpt.pt
seed = 1337                     # in [0, inf): same seed + same settings = same losses on CPU
# model
n_layer = ByDevice(cpu=2, cuda=6)  # in [1, inf): depth; on 2 cores fewer layers, more steps win (docs/log.md)
n_head = ByDevice(cpu=4, cuda=6)  # in [1, inf): attention heads
n_embd = ByDevice(cpu=128, cuda=384)  # in [2, inf): width (n_head heads of an even size: rotary)
token_mix = 3                   # in [1, inf): input at t mixes the last this many chars (1 = off)
block_size = 256                # in [2, inf): context in characters (RLHF: prompt + a turn fit)
dropout = ByDevice(cpu=0.0, cuda=0.2)  # in [0, 1): the small CPU model underfits: dropout only costs it
# optimisation: AdamW, linear warmup, then decay (cosine: nanoGPT's schedule)
batch_size = ByDevice(cpu=3, cuda=64)  # in [1, inf): sequences per micro-batch: on 2 cores, steps count
gradient_accumulation_steps = None  # int in [1, inf) or None: micro-batches a step, all ranks (None: 1 each)
max_iters = ByDevice(cpu=6000, cuda=5000)  # in [0, inf): optimizer steps (times: README)
learning_rate = ByDevice(cpu=3e-3, cuda=1e-3)  # in (0, inf): a tiny model takes a high lr
min_lr_ratio = ByDevice(cpu=0.0, cuda=0.1)  # in [0, 1]: decay ends at lr * this (CPU: 0 wins, docs/log.md)
lr_decay = ByDevice(cpu='linear', cuda='cosine')  # in {'cosine', 'linear'}: linear: Bergsma et al. 2025
warmup_iters = 100              # in [0, inf): short warmup: tiny models tolerate a high lr early
weight_decay = 0.1              # in [0, inf): on matrices only (not norms, not biases)
beta1, beta2 = 0.9, 0.99        # in [0, 1): beta2 0.99 as nanoGPT's shakespeare_char: few tokens/step
grad_clip = 1.0                 # in [0, inf): clip the global grad norm (0 = off)
# evaluation and logging
eval_interval = ByDevice(cpu=1000, cuda=250)  # in [1, inf): iters between train/val loss estimates
eval_iters = ByDevice(cpu=20, cuda=200)  # in [1, inf): batches per estimate (final: the whole val split)
patience = ByDevice(cpu=None, cuda=4)  # int in [1, inf) or None: stop after this many evals with no new best
log_interval = 100              # in [1, inf): iters between log lines
sample_chars = 500              # in [0, inf): characters sampled at the end
compile = False                 # torch.compile (worth it on GPU; CPU compile costs more)
# ----------------------------------------------------------------------------------------


def get_batch(data, block_size, batch_size, generator, device='cpu'):
    """batch_size random windows of a split (1-D tokens): inputs x and next characters y, (B, T) each."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([data[i:i + block_size] for i in ix])  # (B, T)
    y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix])  # (B, T), shifted by one
    if torch.device(device).type == 'cuda':  # from pinned memory, the copy overlaps the GPU's work
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def start_processes(seed, device):
    """One process, or N under torchrun (it sets RANK, LOCAL_RANK and WORLD_SIZE): one GPU each
    (NCCL) or CPU processes (gloo). Seeds torch with seed + rank, as nanoGPT, so each rank draws its
    own dropout masks (DDP gives all ranks rank 0's initial weights). -> (rank, world, device)."""
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    if 'RANK' in os.environ:
        here = int(os.environ.get('LOCAL_WORLD_SIZE', world))  # processes on this machine
        if torch.device(device).type == 'cuda':
            if here > torch.cuda.device_count():
                raise MinibardError(f'torchrun started {here} processes, one a GPU, and this machine has '
                                    f'{torch.cuda.device_count()}: give --nproc_per_node at most that')
            device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    torch.manual_seed(seed + rank)
    return rank, world, device


def get_lr(it, lr, warmup, total, min_ratio, decay):
    """The lr at iteration it: linear warmup over `warmup` iterations, then 'cosine' or 'linear'
    decay to lr * min_ratio at iteration `total`, held there."""
    if it < warmup:
        return lr * (it + 1) / warmup
    ratio = min(1.0, (it - warmup) / max(1, total - warmup))
    left = 0.5 * (1 + math.cos(math.pi * ratio)) if decay == 'cosine' else 1 - ratio  # 1 -> 0
    return lr * min_ratio + left * (lr - lr * min_ratio)


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def estimate_loss(model, splits, block_size, batch_size, n_batches, seed, device, ctx=nullcontext(),
                  at_once=1):
    """{split: mean loss} over the same n_batches random batches at every call, under ctx (training's
    autocast), `at_once` batches a forward (a GPU is faster with few big calls)."""
    model.eval()
    out = {}
    for name, data in splits.items():
        gen = torch.Generator().manual_seed(seed + 1)
        x, y = get_batch(data, block_size, n_batches * batch_size, gen, device)  # (n B, T), as n draws of B
        chunk = at_once * batch_size
        with ctx:
            losses = torch.stack([model(xb, yb)[1] for xb, yb in zip(x.split(chunk), y.split(chunk))])
        out[name] = sum(losses.tolist()) / len(losses)  # one copy back to the host
    model.train()
    return out


@torch.no_grad()
def split_loss(model, data, batch=64):
    """Mean cross-entropy over a whole split (1-D tokens), in non-overlapping block_size windows."""
    T, dev = model.config.block_size, next(model.parameters()).device
    n = (len(data) - 1) // T
    x, y = data[:n * T].view(n, T).to(dev), data[1:n * T + 1].view(n, T).to(dev)  # (n, T) each
    total = sum(model(xb, yb)[1].item() * len(xb) for xb, yb in zip(x.split(batch), y.split(batch)))
    return total / n


# ------------------------------------------------------------------ pretraining
if __name__ == '__main__':
    # One process, or N under torchrun (DDP, as nanoGPT's train.py): rank 0 logs and writes.
    config = configure(globals(), sys.argv[1:], torchrun=True)  # each option against its rule, then:
    if max_iters == 0 and init_from == 'scratch':
        die('--max_iters=0 from scratch trains nothing: give it some iterations, or add '
            '--init_from=resume to re-measure out_dir/gpt.pt')
    if n_embd % n_head or (n_embd // n_head) % 2:
        die(f'--n_embd={n_embd} must split into --n_head={n_head} heads of an even size (rotary pairs)')
    ddp, world = 'RANK' in os.environ, int(os.environ.get('WORLD_SIZE', 1))
    accum = gradient_accumulation_steps or world  # micro-batches a step, all ranks
    if accum % world:
        die(f'--gradient_accumulation_steps={accum} must be a multiple of the {world} processes (each takes '
            'an equal share of every step)')
    ckpt_path = os.path.join(out_dir, 'gpt.pt')
    tokens_per_iter = batch_size * accum * block_size
    if init_from == 'scratch':  # a quick try never replaces a longer-trained gpt.pt
        refuse_to_replace(ckpt_path, max_iters * tokens_per_iter, 'characters')
    rank, world, device = start_processes(seed, device)
    config['device'], master = device, rank == 0
    if not master:
        sys.stdout = open(os.devnull, 'w')  # one log, rank 0's
    cuda = device.startswith('cuda')  # CPU: fp32
    t_start = time.time()
    prepare_out_dir(out_dir, 'gpt' if master else None)
    train_data, val_data, vocab = load_splits(data_path)
    splits = {'train': train_data, 'val': val_data}
    if block_size >= len(val_data):
        die(f'--block_size={block_size} is not shorter than the validation text ({len(val_data):,} chars)')
    # micro-batch j of every step comes from data stream j (seed + j): the same windows whether one
    # process takes them all or N ranks take accum / N each; this rank's streams are `mine`
    mine = range(rank * accum // world, (rank + 1) * accum // world)
    gens = [torch.Generator().manual_seed(seed + j) for j in mine]
    model_args = dict(block_size=block_size, vocab_size=len(vocab), n_layer=n_layer, n_head=n_head,
                      n_embd=n_embd, token_mix=token_mix, dropout=dropout)
    iter_num, best_val, checkpoint = 0, float('inf'), None
    if init_from == 'resume':
        checkpoint = load_checkpoint(ckpt_path, kind='GPT', stale_ok=True)  # (pretraining has no parent)
        if not {'optimizer', 'iter_num', 'best_val_loss'} <= set(checkpoint):
            die(f'{ckpt_path} was not written by gpt.py (it has no optimizer state: a model of a later '
                'step?): --init_from=resume continues a run of python gpt.py')
        if checkpoint['vocab'] != vocab:
            die(f'{ckpt_path} was trained on another vocabulary than {data_path}')
        given = {a[2:].split('=')[0] for a in sys.argv[1:]} & set(model_args) - {'vocab_size'}
        if any(model_args[k] != checkpoint['model_args'].get(k) for k in given):
            die(f'{ckpt_path} has {checkpoint["model_args"]}: a resumed model keeps its shape; drop '
                + ', '.join(f'--{k}' for k in sorted(given)) + ', or train from scratch in another --out_dir')
        model_args = checkpoint['model_args']  # and the windows it was trained on:
        block_size, tokens_per_iter = model_args['block_size'], batch_size * accum * model_args['block_size']
        iter_num, best_val = checkpoint['iter_num'], checkpoint['best_val_loss']
        states = checkpoint.get('rng_states') or [checkpoint['rng_state']]  # (before 2026-12-01: one)
        if len(states) != accum:  # one per data stream
            die(f'{ckpt_path} was trained with {len(states)} micro-batches a step: resume with '
                f'--gradient_accumulation_steps={len(states)} (with a number of processes that divides it)')
        for g, j in zip(gens, mine):
            g.set_state(states[j])
    model = GPT(GPTConfig(**model_args)).to(device)
    optimizer = model.configure_optimizers(weight_decay, lr=learning_rate, betas=(beta1, beta2), fused=True)
    if checkpoint is not None:
        load_weights(model, checkpoint['model'], ckpt_path, 'python gpt.py')
        load_weights(optimizer, checkpoint['optimizer'], ckpt_path, 'python gpt.py')
        print(f'resuming from {ckpt_path} at iter {iter_num} (best val loss {best_val:.4f})')
    fwd = torch.compile(model) if compile else model  # evaluation: this rank alone
    step_fwd = DDP(fwd) if ddp else fwd  # training: gradients averaged
    ctx = torch.autocast('cuda', dtype=torch.bfloat16) if cuda else nullcontext()
    print(f'{model.num_params() / 1e6:.2f}M parameters, {len(train_data):,} train / '
          f'{len(val_data):,} val chars, device {device}'
          + (f', {world} processes x {accum // world} micro-batch(es) of {batch_size}' if ddp else '')
          + (f', {accum} micro-batches of {batch_size} a step' if accum > 1 and not ddp else ''))

    train_time, since_best, saved = 0.0, 0, False
    diverged = f'try a lower --learning_rate; {ckpt_path} keeps the last good model'
    t_loop, start_iter = time.time(), iter_num  # the pace for the eta
    while True:
        if iter_num % eval_interval == 0 or iter_num == max_iters:
            losses = estimate_loss(fwd, splits, block_size, batch_size, eval_iters, seed, device, ctx,
                                   8 if cuda and eval_iters % 8 == 0 else 1)
            states = [g.get_state() for g in gens]  # every stream, for a resume
            if ddp:  # every rank makes every collective call; rank 0's losses decide for all
                everyone = [None] * world
                dist.all_gather_object(everyone, (losses, states))
                losses, states = everyone[0][0], [s for _, rank_states in everyone for s in rank_states]
            print(f'step {iter_num}: train loss {losses["train"]:.4f}, val loss {losses["val"]:.4f}'
                  + (f', {eta(iter_num, max_iters, t_loop, start_iter)}' if iter_num > start_iter else ''))
            if not math.isfinite(losses['val']):
                die(f'val loss is {losses["val"]} at iter {iter_num}: {diverged}')
            since_best = 0 if losses['val'] < best_val else since_best + 1
            if since_best == 0:
                best_val = losses['val']
                if iter_num > 0 and master:
                    save_checkpoint({'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                                     'model_args': model_args, 'config': config, 'vocab': vocab,
                                     'iter_num': iter_num, 'best_val_loss': best_val,
                                     'train_loss': losses['train'], 'rng_states': states,
                                     'budget': iter_num * tokens_per_iter}, ckpt_path)
                    saved = True
        if patience and since_best >= patience and iter_num < max_iters:
            print(f'stopped: no better val loss in {patience} evaluations '
                  f'(--patience=None trains all {max_iters})')
            break
        if iter_num >= max_iters:
            break
        t0 = time.time()
        for group in optimizer.param_groups:
            group['lr'] = get_lr(iter_num, learning_rate, warmup_iters, max_iters, min_lr_ratio, lr_decay)
        step_loss = 0.0
        for i, g in enumerate(gens):  # L = 1/accum sum_j L_j over all ranks
            x, y = get_batch(train_data, block_size, batch_size, g, device)  # (B, T) each
            if ddp:  # average over ranks at the last only
                step_fwd.require_backward_grad_sync = i == len(gens) - 1
            with ctx:
                _, loss = step_fwd(x, y)
            (loss * world / accum).backward()  # DDP's average over ranks: / world
            step_loss += loss.detach() / len(gens)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.time() - t0
        train_time += dt
        iter_num += 1
        if iter_num % log_interval == 0:
            if ddp:
                dist.all_reduce(step_loss)  # the mean over all ranks' micro-batches
                step_loss /= world
            lossf = float(step_loss)
            if not math.isfinite(lossf):
                die(f'loss is {lossf} at iter {iter_num}: {diverged}')
            print(f'iter {share_done(iter_num, max_iters)}: loss {lossf:.4f}, time {dt * 1000:.1f} ms, '
                  f'{tokens_per_iter / dt:,.0f} tok/s, {eta(iter_num, max_iters, t_loop, start_iter)}')
    if ddp:  # every rank done with gloo/NCCL before any lets go of it
        dist.barrier()
        dist.destroy_process_group()
    if not master:
        sys.exit(0)

    seconds = time.time() - t_start
    if not saved and init_from == 'scratch':
        die(f'no evaluation beat the untrained model\'s val loss: {ckpt_path} was not written; try another '
            '--learning_rate or more --max_iters')
    model, _, best = load_gpt(ckpt_path, device=device)  # the best checkpoint:
    with ctx:
        val_loss = split_loss(model, val_data)  # its loss on the whole val split
    print(f'best checkpoint (iter {best["iter_num"]}): val loss {val_loss:.4f} on all {len(val_data):,} '
          'val chars')
    start_ids = torch.tensor([encode('\n', vocab)], device=device)
    sample = model.generate(start_ids, sample_chars, generator=torch.Generator(device).manual_seed(seed))[0]
    print('-' * 80 + '\n' + decode(sample[0, 1:], vocab) + '\n' + '-' * 80)
    tokens = (iter_num - start_iter) * tokens_per_iter  # trained by this run
    metrics = {'val_loss': round(val_loss, 4), 'train_loss': round(best['train_loss'], 4), 'iters': iter_num,
               'seconds': round(seconds, 1), 'params': model.num_params(), 'device': device,
               'processes': world, 'tokens_per_sec': round(tokens / max(train_time, 1e-9))}
    write_json(metrics, os.path.join(out_dir, 'gpt.json'))
    print(json.dumps(metrics))
