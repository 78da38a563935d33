"""
bench.py: time a training step and generation, KV cache against recomputing the window.

    python bench.py                      # the CPU default model shape, batch 64, 256 new chars
    python bench.py --batch=16 --new_tokens=512

Recompute is what generation does without a cache (nanoGPT's generate): crop the context to
the last block_size characters and run the whole window through the model for every new
character. The KV cache runs one position per character (see GPT.generate).
"""
import sys
import time

import torch

import gpt
from gpt import GPT, GPTConfig
from plumbing import configure

# ----------------------------------------------------------------------------------------
# hyperparameters (`--key=value` overrides any of them; the model shape is gpt.py's)
batch = 64          # in [1, inf): sequences generated at once
new_tokens = 256    # in [1, inf): characters generated per sequence
prompt = 16         # in [1, inf): prompt length
repeats = 3         # in [1, inf): timings are the median of this many runs
seed = 0            # in [0, inf): weights and prompts
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def generate_recompute(model, idx, max_new_tokens, generator):
    """Sampling without a cache: a full forward over the cropped window at every step."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:])
        probs = torch.softmax(logits[:, -1].float(), -1)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], 1)
    return idx


def median_time(fn, repeats):
    """The median wall time of `repeats` calls of fn()."""
    times = []
    for _ in range(repeats):
        t0 = time.time()
        fn()
        times.append(time.time() - t0)
    return sorted(times)[len(times) // 2]


if __name__ == '__main__':
    configure(globals(), sys.argv[1:])
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=gpt.block_size, n_layer=gpt.n_layer, n_head=gpt.n_head, n_embd=gpt.n_embd,
                    token_mix=gpt.token_mix)
    model = GPT(cfg).eval()
    print(f'model: {model.num_params() / 1e6:.2f}M params, block_size {cfg.block_size}, '
          f'{torch.get_num_threads()} threads')
    # one training step at the pretraining batch shape
    train_model = GPT(cfg)
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-3)
    x = torch.randint(0, 65, (gpt.batch_size, cfg.block_size))

    def step():
        _, loss = train_model(x, x.roll(-1, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step()
    t = median_time(step, repeats)
    print(f'train step (batch {gpt.batch_size} x {cfg.block_size}): {t * 1000:.1f} ms, '
          f'{gpt.batch_size * cfg.block_size / t:,.0f} tok/s')
    # generation
    idx = torch.randint(0, 65, (batch, prompt))
    cached = lambda: model.generate(idx, new_tokens, generator=torch.Generator().manual_seed(0))
    recomputed = lambda: generate_recompute(model, idx, new_tokens, torch.Generator().manual_seed(0))
    t_cache, t_full = median_time(cached, repeats), median_time(recomputed, repeats)
    n = batch * new_tokens
    print(f'generate batch {batch} x {new_tokens} new chars: KV cache {t_cache:.2f} s ({n / t_cache:,.0f} '
          f'chars/s), recompute {t_full:.2f} s ({n / t_full:,.0f} chars/s): {t_full / t_cache:.1f}x faster '
          'with the cache')
