"""
bench.py: time a training step and generation, KV cache against recomputing the window; or
check the chat (sample.py's chat and web modes) on the trained models.

    python bench.py                      # the CPU default model shape, batch 64, 256 new chars
    python bench.py --batch=16 --new_tokens=512
    python bench.py --what=chat          # after ppo.py: how chat answers end, P's calibration on
                                         # what the chat shows, answers through HTTP

Recompute is what generation does without a cache (nanoGPT's generate): crop the context to
the last block_size characters and run the whole window through the model for every new
character. The KV cache runs one position per character (see GPT.generate).
"""
import json
import os
import re
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

import gpt
from configurator import configure, resolve_defaults
from data import END_OF_TURN, answer_texts, as_turns, encode, end_of_turn, trim_to_whole
from labeler import all_pairs, gold_score, label, pair_metrics
from model import GPT, GPTConfig, load_policy_and_rm, rm_scores
from plumbing import load_checkpoint
from sample import checkpoint_path, make_server, reply

CHAT_LINES = [  # what people say to the bard: greetings, questions, orders, verse, prose, one word
    'What light through yonder window breaks?', 'Good morrow, fair lady.', 'Wilt thou be gone?',
    'I love thee, sweet lady.', 'Who art thou?', 'Tell me, what news from Verona?', 'Ay.', 'Speak!',
    'The king is dead; long live the king.', 'O, that I were a glove upon that hand!',
    'Hast thou no friends?', 'Away, thou villain! Thou art a traitor and a coward.',
    'Thy tears are salt; wipe them, and be merry.', 'Farewell, farewell; one kiss, and I will descend.',
    'Is the day so young?', 'Come, come, you talk greedily.',
    'What is the hour?', 'Where is my father?', 'Shall I compare thee to a summer day?', 'I am hungry.',
    'Give me thy hand.', 'Why dost thou weep?', 'Let us go to the feast tonight.', 'Good night, good night!']

# ----------------------------------------------------------------------------------------
# hyperparameters (`--key=value` overrides any of them; the model shape is gpt.py's)
what = 'speed'      # in {'speed', 'chat'}: speed of the model code, or the chat check (out_dir's models)
out_dir = 'out'     # chat: reads ppo.pt (or sft.pt), reward.pt and preferences.pt there
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


def treated_as_chat(data, vocab, prompt_len, tau, seed):
    """The held-out comparisons of preferences.pt with every answer as the chat shows it: ended
    where its turn ends, trimmed to whole lines if it ran out (data.trim_to_whole), then a turn (text and
    blank line); gold and the labeler's choices drawn again on that text. -> (seqs, lengths, g,
    prefs, the share of answers changed)."""
    P, K, _ = data['seqs'].shape
    texts = answer_texts(data['seqs'].view(P * K, -1)[:, prompt_len:], data['lengths'].flatten(), vocab)
    shown = [trim_to_whole(*end_of_turn(t))[0] for t in texts]
    answers, lengths = as_turns(shown, vocab)  # as reply() scores them
    seqs = torch.cat([data['seqs'].view(P * K, -1)[:, :prompt_len].long(), answers], 1)
    g = torch.tensor([float(gold_score(t)) for t in shown]).view(P, K)
    i, j = all_pairs(K)
    prefs = label(g[:, i], g[:, j], tau, generator=torch.Generator().manual_seed(seed))
    changed = sum(a != b + END_OF_TURN for a, b in zip(texts, shown)) / len(texts)
    return seqs, lengths, g, prefs, changed


def chat_check(out_dir, seed):
    """The chat on the trained models: calibration of P on what it shows, how answers end, and
    answers through HTTP (one client, then 4 at once). Writes out_dir/chat_check.json."""
    path = checkpoint_path('ppo', out_dir)
    model, vocab, _, rm, _ = load_policy_and_rm(path, os.path.join(out_dir, 'reward.pt'))
    data = load_checkpoint(os.path.join(out_dir, 'preferences.pt'), 'python reward.py',
                           kind='preference data')
    score = torch.no_grad()(rm_scores)
    Tp, tau, max_len, val = data['prompt_len'], data['tau'], data['max_answer_len'], data['val']
    P, K, _ = val['seqs'].shape
    r = score(rm, val['seqs'].view(P * K, -1).long(), Tp, val['lengths'].flatten()).view(P, K)
    as_trained = pair_metrics(r, val['g'], val['prefs'], tau)
    seqs, lengths, g, prefs, changed = treated_as_chat(val, vocab, Tp, tau, seed)
    r = score(rm, seqs, Tp, lengths).view(P, K)
    as_shown = pair_metrics(r, g, prefs, tau)
    print(f"P's calibration on the {as_shown['pairs']:,} held-out comparisons ({P} prompts x {K} answers "
          f"of {data['policy']}): ece {as_trained['ece']:.4f} as the RM was trained, {as_shown['ece']:.4f} "
          f"with the answers as the chat shows them ({changed:.0%} of them changed); gold_acc "
          f"{as_trained['gold_acc']:.3f} / {as_shown['gold_acc']:.3f}")
    stop, gen, turns, answers = encode(END_OF_TURN, vocab), torch.Generator().manual_seed(seed), [], []
    for line in CHAT_LINES:  # one scene, as a user would talk
        turns.append(('ROMEO', line))
        answers.append(reply(model, rm, vocab, turns, 'JULIET', max_len, stop, gen))
        turns.append(('JULIET', answers[-1]['answer']))
    whole = [re.search(r'last whole (\w+)', a['note']) for a in answers]  # None: cut mid-word
    kinds = [(m.group(1) if m else 'mid_word') if a['cut'] else 'ended' for a, m in zip(answers, whole)]
    count = {k: kinds.count(k) for k in ('ended', 'line', 'sentence', 'word')}
    mid_word = len(answers) - sum(count.values())  # cut with no whole line, sentence or word
    print(f'{len(answers)} chat lines: {count["ended"]} answers ended on their own, cut and shown to a '
          f'whole line {count["line"]}, sentence {count["sentence"]}, word {count["word"]}; '
          f'cut mid-word: {mid_word}')
    for line, a in zip(CHAT_LINES[:4], answers):
        note = f", {a['note']}" if a['note'] else ''
        print(f"  ROMEO: {line}\n  JULIET: {a['answer']!r}  [P = {a['p']:.2f}{note}]")
    chat = lambda turns, n: reply(model, rm, vocab, turns, 'JULIET', max_len, stop, gen, n)
    server = make_server('127.0.0.1', 0, chat, vocab, 'ROMEO', 'JULIET', path, data['policy'], quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f'http://127.0.0.1:{server.server_address[1]}/chat'

    def ask(line):
        body = json.dumps({'history': [], 'line': line, 'best_of': 1}).encode()
        t0 = time.time()
        with urllib.request.urlopen(urllib.request.Request(url, body), timeout=60) as f:
            return f.status, json.load(f), time.time() - t0
    one = [ask(line) for line in CHAT_LINES[:10]]  # one client: the wall time of an answer
    with ThreadPoolExecutor(max_workers=4) as pool:
        four = list(pool.map(ask, CHAT_LINES[:20]))
    server.shutdown()
    times = sorted(t for *_, t in one)
    ok = sum(status == 200 and 0 <= a['p'] <= 1 for status, a, _ in four)
    print(f'HTTP, one client: an answer in {times[len(times) // 2]:.2f} s (median of {len(one)}, max '
          f'{times[-1]:.2f} s); 4 clients at once: {ok} of {len(four)} answered')
    result = {'ece_as_trained': as_trained['ece'], 'ece_as_shown': as_shown['ece'],
              'answers_changed': changed, 'gold_acc_as_shown': as_shown['gold_acc'],
              'chat_lines': len(answers), **count,
              'mid_word': mid_word, 'http_median_s': times[len(times) // 2], 'http_max_s': times[-1],
              'concurrent_ok': ok, 'concurrent_sent': len(four), 'checkpoint': path}
    with open(os.path.join(out_dir, 'chat_check.json'), 'w') as f:
        json.dump(result, f, indent=2)


if __name__ == '__main__':
    configure(globals(), sys.argv[1:])
    torch.manual_seed(seed)
    if what == 'chat':
        chat_check(out_dir, seed)
        sys.exit(0)
    shape = dict(vars(gpt))
    resolve_defaults(shape, 'cpu')  # gpt.py's CPU sizes
    cfg = GPTConfig(**{k: shape[k] for k in ('block_size', 'n_layer', 'n_head', 'n_embd', 'token_mix')})
    batch_size = shape['batch_size']  # pretraining's sequences a step
    model = GPT(cfg).eval()
    print(f'model: {model.num_params() / 1e6:.2f}M params, block_size {cfg.block_size}, '
          f'{torch.get_num_threads()} threads')
    # one training step at the pretraining batch shape
    train_model = GPT(cfg)
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-3)
    x = torch.randint(0, 65, (batch_size, cfg.block_size))

    def step():
        _, loss = train_model(x, x.roll(-1, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step()
    t = median_time(step, repeats)
    print(f'train step (batch {batch_size} x {cfg.block_size}): {t * 1000:.1f} ms, '
          f'{batch_size * cfg.block_size / t:,.0f} tok/s')
    # generation
    idx = torch.randint(0, 65, (batch, prompt))
    cached = lambda: model.generate(idx, new_tokens, generator=torch.Generator().manual_seed(0))
    recomputed = lambda: generate_recompute(model, idx, new_tokens, torch.Generator().manual_seed(0))
    t_cache, t_full = median_time(cached, repeats), median_time(recomputed, repeats)
    n = batch * new_tokens
    print(f'generate batch {batch} x {new_tokens} new chars: KV cache {t_cache:.2f} s ({n / t_cache:,.0f} '
          f'chars/s), recompute {t_full:.2f} s ({n / t_full:,.0f} chars/s): {t_full / t_cache:.1f}x faster '
          'with the cache')
