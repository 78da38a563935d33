"""minibard tests: the math against naive references, then tiny end-to-end runs of the scripts.

Run: python -m pytest -q test_all.py     (tiny configs, not the defaults; shared setup: conftest.py)

The end-to-end runs (fixture `runs`, conftest.py) start in the background with the first test
and go on while the in-process tests run; each test that reads one waits for it. Each runs a
script's __main__ as `python script args` would, in a process forked from one that has imported
torch once; torchrun, Ctrl-C and the second pretraining run are fresh `python` processes (that
one gives the forked run's numbers). Sections follow the modules in the order they import each
other (plumbing.py, configurator.py, data.py, model.py, labeler.py, frontier.py, gpt.py, sft.py,
reward.py, ppo.py, dpo.py, expert_iteration.py, sample.py), then the pipeline end to end, then
every script's options, --help and a user's mistakes.
"""
import ast
import csv
import http.client
import json
import math
import os
import re
import runpy
import shutil
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import plumbing
import ppo
from configurator import ByDevice, check_option, configure, resolve_defaults
from conftest import (CHAT_LINES, HERE, TINY, TINY_EI, TINY_GPT, VOCAB, StubRM, copy_ckpts, run, save_tiny,
                      tiny_model)
from data import (TAG, answer_mask, decode, encode, end_of_turn, format_chat, load_splits, load_text,
                  trim_to_whole, turn_starts, whiten)
from dpo import answer_logprobs, dpo_loss
from expert_iteration import fine_tune, keep_best
from frontier import best_of_n, best_of_n_curve, gold_at_kl, measure_policy
from gpt import get_lr, split_loss, start_processes
from labeler import all_pairs, choice_prob, gold_score, label, pair_metrics, repeated_word, repeats_a_word
from model import (GPT, GPTConfig, KVCache, RewardModel, exact_kl, load_gpt, load_reward_model, rm_scores,
                   token_logprobs)
from plumbing import (MinibardError, cached, load_checkpoint, prepare_out_dir, read_json, save_checkpoint,
                      write_json)
from ppo import (AdaptiveKLController, Critic, explained_variance, gae, group_advantages, kl_estimates,
                 per_token_rewards, ppo_losses, train as ppo_train)
from reward import (Preferences, bow_features, bow_scores, evaluate_rm, fit_bow, pairwise_loss,
                    train_reward_model)
from sample import make_server, reply
from sft import copy_rate, demonstrations, sft_loss


# ================================================ the house: which file imports which
HOUSE = ['plumbing', 'configurator', 'data', 'model', 'labeler', 'frontier',  # in DESIGN.md's order
         'gpt', 'sft', 'reward', 'ppo', 'dpo', 'expert_iteration', 'sample']
STEPS = {'gpt', 'sft', 'reward', 'ppo', 'dpo', 'expert_iteration', 'sample'}
STEP_IMPORTS = {('dpo', 'reward'): {'pairwise_loss'},  # DPO is reward.py's Bradley-Terry loss on log-ratios
                ('expert_iteration', 'sft'): {'sft_loss'}}  # expert iteration: SFT on the RM's picks


def project_imports(module):
    """{imported project module: the names taken from it} of HERE/<module>.py, every import in it."""
    tree = ast.parse(open(os.path.join(HERE, f'{module}.py'), encoding='utf-8').read())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in HOUSE:
            found.setdefault(node.module, set()).update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in HOUSE:
                    found.setdefault(a.name, set()).add('*')
    return found


def test_files_import_earlier_files_and_no_step_another():
    """Later files import earlier ones, never the other way; a step imports no other step but for
    dpo.py's Bradley-Terry loss; frontier.py (the ruler) imports no step."""
    for i, module in enumerate(HOUSE):
        for other, names in project_imports(module).items():
            assert HOUSE.index(other) < i, f'{module}.py imports the later {other}.py'
            if module in STEPS and other in STEPS:
                assert names <= STEP_IMPORTS.get((module, other), set()), (module, other, names)
    assert not set(project_imports('frontier')) & STEPS


# ========================================================= plumbing.py: checkpoints
def test_checkpoint_round_trip(tmp_path):
    m = tiny_model(3)
    path = str(tmp_path / 'm.pt')
    save_tiny(m, path)
    assert os.listdir(tmp_path) == ['m.pt']  # no temp file left behind
    m2, vocab, _ = load_gpt(path)
    idx = torch.randint(0, 65, (2, 16))
    assert vocab == VOCAB and torch.equal(m(idx)[0], m2(idx)[0])


def test_a_full_disk_while_saving_keeps_the_saved_checkpoint(tmp_path, monkeypatch):
    """torch.save failing mid-write, as on a full disk (torch says so as a RuntimeError): one line, the
    checkpoint there before is intact and no temp file is left."""
    path = str(tmp_path / 'gpt.pt')
    save_tiny(tiny_model(), path)
    before = open(path, 'rb').read()

    def full(obj, f):
        open(f, 'wb').write(b'half a checkpoint')
        raise RuntimeError('PytorchStreamWriter failed writing file data/0: file write failed')
    monkeypatch.setattr(torch, 'save', full)
    with pytest.raises(MinibardError, match='is the disk full'):
        save_checkpoint({'model': {}}, path)
    assert open(path, 'rb').read() == before and os.listdir(tmp_path) == ['gpt.pt']


def test_damaged_results_are_named_and_skipped(tmp_path, capsys):
    """A kept json cut short, empty, not UTF-8, of another shape or missing: None and one note that
    names the file (never a traceback); a kept result of another shape is computed again."""
    damaged = {'cut.json': b'{"path": [{"gold', 'empty.json': b'', 'latin1.json': b'{"a": "\xe9"}',
               'shape.json': b'[1, 2]', 'nested.json': b'[' * 100000 + b']' * 100000}
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        assert read_json(str(tmp_path / name), lambda x: isinstance(x, dict)) is None
        err = capsys.readouterr().err
        assert f'{name} is damaged' in err and err.count('\n') == 1, err
    assert read_json(str(tmp_path / 'none.json')) is None and capsys.readouterr().err == ''
    key = {'model': 'abc'}
    write_json({json.dumps(key): {'rows': 'of another shape'}}, str(tmp_path / 'kept.json'))
    kept = cached(str(tmp_path / 'kept.json'), key, lambda: {'rows': [1, 2]},
                  lambda r: isinstance(r['rows'], list))
    assert kept == {'rows': [1, 2]} and 'another shape: measured again' in capsys.readouterr().out
    assert cached(str(tmp_path / 'kept.json'), key, lambda: 1 / 0) == {'rows': [1, 2]}  # read back


@pytest.mark.skipif(plumbing.fcntl is None or not hasattr(os, 'fork'), reason='no file locks here')
def test_one_run_of_a_stage_a_folder_and_no_temp_files_of_killed_saves(tmp_path):
    """prepare_out_dir: a temp file a killed save left (its process gone) is removed, a live one's
    stays; the stage's lock is held, so a second process of the same stage on the folder is refused."""
    (tmp_path / 'ppo.pt.tmp999999999').write_bytes(b'half')
    (tmp_path / f'ppo.json.tmp{os.getpid()}').write_bytes(b'being written')
    prepare_out_dir(str(tmp_path), 'ppo')
    assert sorted(os.listdir(tmp_path)) == ['.ppo.lock', f'ppo.json.tmp{os.getpid()}']
    prepare_out_dir(str(tmp_path), 'ppo')  # this process again: still its own
    pid = os.fork()  # another process: refused
    if pid == 0:
        plumbing.LOCKS.clear()  # (the child's own lock, not the one it inherits)
        try:
            prepare_out_dir(str(tmp_path), 'ppo')
        except MinibardError as e:
            os._exit(3 if 'another python ppo.py is writing to' in str(e) else 4)
        os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 3
    prepare_out_dir(str(tmp_path), 'dpo')  # another stage beside it is fine


# ========================================================= configurator.py: options
def test_overrides_parse_and_type_check(capsys):
    scope = {'batch_size': 32, 'learning_rate': 1e-3, 'out_dir': 'out', 'compile': False, 'top_k': None,
             '_hidden': 1}
    cfg = configure(scope, ['--batch_size=8', '--learning_rate=1', '--out_dir=/tmp/x', '--compile=True',
                            '--top_k=5'])
    assert cfg == {'batch_size': 8, 'learning_rate': 1.0, 'out_dir': '/tmp/x', 'compile': True, 'top_k': 5}
    assert type(scope['learning_rate']) is float
    for bad, words in [('--batch_size=abc', 'expects int'), ('--compile=1', 'expects bool'),
                       ('--learning_rat=3', 'did you mean --learning_rate'), ('--_hidden=2',
                                                                              'unknown option'),
                       ('batch_size=3', '--key=value')]:
        with pytest.raises(MinibardError, match=re.escape(words)):
            configure(dict(scope), [bad])


def test_option_rules_by_hand():
    """The rule parser on hand cases: open and closed ends, sets, None, and the type of a None default."""
    ok = [(0.5, 'in [0, 1): x'), (0, 'in [0, 1)'), (1, 'in (0, 1]'), ('a', "in {'a', 'b'}: c"),
          (None, 'int in [1, inf) or None'),
          (7, 'int in [1, inf) or None'), (10 ** 9, 'in [1, inf)'), ('x', 'any comment'), (-3.0,
                                                                                           'no rule here')]
    bad = [(1, 'in [0, 1)'), (0, 'in (0, 1]'), ('c', "in {'a', 'b'}"), (None, 'in [1, inf)'),
           (0, 'int in [1, inf) or None'),
           ('abc', 'int in [1, inf) or None'), (2.5, 'int in [1, inf) or None'), ('', 'a string, no rule')]
    for value, comment in ok:
        check_option('opt', value, comment)  # returns quietly
    for value, comment in bad:
        with pytest.raises(MinibardError):
            check_option('opt', value, comment)


# ============================================== data.py: the codec, turns, the chat
def test_codec_round_trip():
    s = 'ROMEO:\nO, she doth teach the torches to burn bright!'
    assert decode(encode(s, VOCAB), VOCAB) == s and len(VOCAB) == 65


def test_chat_format_and_trimming():
    turns = [('ROMEO', 'Hi'), ('JULIET', 'Hello'), ('ROMEO', 'Bye')]
    assert format_chat(turns, 'JULIET', 100) == 'ROMEO:\nHi\n\nJULIET:\nHello\n\nROMEO:\nBye\n\nJULIET:\n'
    # oldest turn dropped
    assert format_chat(turns, 'JULIET', 35) == 'JULIET:\nHello\n\nROMEO:\nBye\n\nJULIET:\n'
    assert format_chat(turns, 'JULIET', 20) == 'ROMEO:\nBye\n\nJULIET:\n'
    assert format_chat([('ROMEO', 'x' * 50)], 'JULIET', 20) == ('ROMEO:\n' + 'x' * 50 + '\n\nJULIET:\n')[-20:]
    assert end_of_turn('Ay, my lord.\nGo.\n\nROMEO:\nStay') == ('Ay, my lord.\nGo.', True)
    # a name, no blank line
    assert end_of_turn('Ay, my lord.\nKING EDWARD IV:\nStay') == ('Ay, my lord.', True)
    assert end_of_turn('Ay, my lord.\nCome, sir: go') == ('Ay, my lord.\nCome, sir: go', False)
    assert end_of_turn('Ay, my lo') == ('Ay, my lo', False)


def test_an_answer_that_runs_out_is_shown_to_its_last_whole_line_or_sentence():
    assert trim_to_whole('Ay, my lord.\nGo hence', False) == ('Ay, my lord.', 'sentence')
    assert trim_to_whole('Ay, my lord,\nGo hence', False) == ('Ay, my lord,', 'line')
    assert trim_to_whole('I am. Thou art not', False) == ('I am.', 'sentence')
    assert trim_to_whole('Come hither, good my lord, and tell', False) == ('Come hither, good my lord, and',
                                                                          'word')
    assert trim_to_whole('Nonesuch', False) == ('Nonesuch', 'none')
    assert trim_to_whole('Go hence', True) == ('Go hence', '')  # a turn that ended is kept whole
    text = open(os.path.join(HERE, 'input.txt')).read()
    for start in range(0, 200000, 997):  # real text cut at 96 characters
        cut = text[start:start + 96]
        shown, how = trim_to_whole(cut, False)
        assert cut.startswith(shown) and shown.strip() and how != 'none'
        # whole words
        assert shown == cut or not (shown[-1].isalpha() and cut[len(shown)].isalpha()), (cut, shown)


def test_a_corpus_without_turns_is_refused_before_training(tmp_path, capsys):
    (tmp_path / 'flat.txt').write_text('To be or not to be. ' * 100)  # no blank line: no turn ends
    assert 'has no blank line' in in_process_error(capsys, load_text, str(tmp_path / 'flat.txt'))
    prose = torch.tensor(encode('To be or not to be.\n\nThat is the question.\n' * 50, VOCAB))  # no speaker
    assert 'no speech start' in in_process_error(capsys, turn_starts, prose, VOCAB, 16)


# ==================================== model.py: the GPT, generate, the reward model
def test_shapes_and_loss():
    m = tiny_model()
    idx = torch.randint(0, 65, (3, 16))
    logits, loss = m(idx)
    assert logits.shape == (3, 16, 65) and loss is None
    _, loss = m(idx, torch.randint(0, 65, (3, 16)))
    assert loss.shape == () and abs(loss.item() - math.log(65)) < 0.5  # near-uniform at init


def test_causal_mask_leaks_nothing():
    m = tiny_model()
    a = torch.randint(0, 65, (2, 16))
    for t in range(15):
        b = a.clone()
        b[:, t + 1:] = torch.randint(0, 65, (2, 15 - t))  # change the future only
        la, lb = m(a)[0], m(b)[0]
        assert torch.equal(la[:, :t + 1], lb[:, :t + 1]), f'position <= {t} saw the future'
    assert not torch.allclose(la[:, -1], lb[:, -1])  # and the change is visible where it may be


def test_kv_cache_matches_full_forward_within_block():
    m = tiny_model()
    idx = torch.randint(0, 65, (2, 16))
    full = m(idx)[0]  # (B, T, V)
    cache = KVCache(TINY, 2, 'cpu', torch.float32)
    steps = [m(idx[:, :5], cache=cache)[0]]  # prefill 5 tokens
    steps += [m(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 16)]  # then one at a time
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4


def test_kv_cache_generate_matches_recompute_past_block_size():
    """generate() past block_size: every logit it sampled from equals a plain forward over its window.

    Window rule (documented in generate): start at the cropped prompt; whenever the context
    would exceed block_size, restart it from the last block_size // 2 tokens."""
    m, bs = tiny_model(), TINY.block_size
    seen = []
    hook = m.register_forward_hook(lambda mod, inp, out: seen.append(out[0][:, -1].clone()))
    prompt = torch.randint(0, 65, (3, 20))  # longer than the context: gets cropped
    out, logps, lengths = m.generate(prompt, 40, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert out.shape == (3, 60) and logps.shape == (3, 40) and torch.equal(out[:, :20], prompt)
    assert lengths.tolist() == [40, 40, 40]
    s = max(0, 20 - bs)
    for i in range(40):
        n = 20 + i  # tokens before new token i
        if n - s > bs:
            s = n - bs // 2
        ref = m(out[:, s:n])[0][:, -1]  # (B, V) full recompute of the window
        assert (seen[i] - ref).abs().max() <= 1e-4, f'step {i}'
        ref_lp = F.log_softmax(ref, -1).gather(-1, out[:, n:n + 1]).squeeze(-1)
        assert (logps[:, i] - ref_lp).abs().max() <= 1e-4


def test_generate_seeded_reproducible_and_temperature_zero_is_argmax():
    m = tiny_model()
    p = torch.randint(0, 65, (4, 3))
    a = m.generate(p, 10, generator=torch.Generator().manual_seed(1))[0]
    b = m.generate(p, 10, generator=torch.Generator().manual_seed(1))[0]
    c = m.generate(p, 10, generator=torch.Generator().manual_seed(2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy, ref = m.generate(p, 10, temperature=0)[0], p
    for _ in range(10):  # naive greedy: full forward, argmax
        ref = torch.cat([ref, m(ref)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, ref)


def test_top_k_and_logprobs_at_temperature():
    m = tiny_model()
    p = torch.randint(0, 65, (64, 4))
    out, lp, _ = m.generate(p, 1, temperature=0.7, top_k=3, generator=torch.Generator().manual_seed(0))
    logits = m(p)[0][:, -1]
    top3 = logits.topk(3).indices
    assert all(out[b, -1] in top3[b] for b in range(64))  # never outside the top 3
    masked = logits.masked_fill(logits < logits.topk(3).values[:, [-1]], float('-inf'))
    assert torch.allclose(lp[:, 0], token_logprobs(masked, out[:, -1], 0.7), atol=1e-5)
    assert torch.allclose(lp[:, 0], F.log_softmax(masked / 0.7, -1).gather(-1, out[:, -1:]).squeeze(-1),
                          atol=1e-5)


def test_generate_stops_each_row_at_its_end_token():
    """Greedy turns with a stop: each row equals a naive greedy loop (full forward every step, no
    cache) cut right after its first stop, padded after; rows end at different steps, so finished
    rows leave the batch mid-way, and the prompt is longer than the context, so the cache restarts."""
    m = tiny_model()
    prompt = torch.randint(0, 65, (24, 20), generator=torch.Generator().manual_seed(3))
    free = m.generate(prompt, 30, temperature=0)[0][:, 20:]  # the greedy paths, no stop
    stop = [free.flatten().mode().values.item()]  # their commonest character
    out, logps, lengths = m.generate(prompt, 30, temperature=0, stop=stop)
    ends, bs = set(), TINY.block_size
    for b in range(24):
        ref, s = prompt[b:b + 1], 20 - bs
        # the naive loop, over generate's window (see the test above)
        for n in range(20, 50):
            if n - s > bs:
                s = n - bs // 2
            ref = torch.cat([ref, m(ref[:, s:n])[0][:, -1].argmax(-1, keepdim=True)], 1)
        path = ref[0, 20:].tolist()
        n = path.index(stop[0]) + 1 if stop[0] in path else 30
        ends.add(n)
        assert lengths[b] == n and out[b, 20:20 + n].tolist() == path[:n], b
        assert (out[b, 20 + n:] == stop[-1]).all() and (logps[b, n:] == 0).all() and (logps[b, :n] < 0).all()
    assert len(ends) >= 4 and out.size(1) == 20 + max(ends)  # rows ended at several steps


def test_generate_ends_after_a_two_token_stop():
    m = tiny_model()
    prompt = torch.randint(0, 65, (16, 4), generator=torch.Generator().manual_seed(4))
    free = m.generate(prompt, 20, temperature=0)[0][:, 4:]
    a, b = free[0, 5].item(), free[0, 6].item()  # row 0 says (a, b) at steps 5, 6
    out, _, lengths = m.generate(prompt, 20, temperature=0, stop=[a, b])
    pairs = [next((i + 2 for i in range(19) if free[r, i] == a and free[r, i + 1] == b),
                  20) for r in range(16)]
    assert lengths.tolist() == pairs and lengths[0] <= 7


def test_weight_decay_on_the_linear_and_embedding_matrices_only():
    """configure_optimizers: decay on the weights of every Linear and Embedding (the tied head
    once), none on the norms or the token mix, each parameter in one group."""
    m = tiny_model()
    opt = m.configure_optimizers(0.1, lr=1e-3, betas=(0.9, 0.99))
    decayed, kept = ({id(p) for p in g['params']} for g in opt.param_groups)
    assert [g['weight_decay'] for g in opt.param_groups] == [0.1, 0.0] and not decayed & kept
    matrices = {id(mod.weight) for mod in m.modules()
                if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding))}  # lm_head's is tok_emb's
    assert decayed == matrices and id(m.tok_mix) in kept
    assert all(id(mod.weight) in kept for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm))
    assert decayed | kept == {id(p) for p in m.parameters()}
    order = [id(p) for p in m.parameters()]  # each group in the model's own order (the tied head once)
    assert all([id(p) for p in g['params']] == [i for i in order if i in ids]
               for g, ids in zip(opt.param_groups, (decayed, kept)))
    assert opt.param_groups[0]['betas'] == (0.9, 0.99) and opt.param_groups[0]['lr'] == 1e-3


def test_reward_model_ignores_padding_and_reads_long_answers_in_its_last_window():
    rm = RewardModel(TINY, context=2).eval()
    torch.nn.init.normal_(rm.head.weight, std=0.3)
    seqs = torch.randint(0, 65, (3, 4 + 9))
    lengths = torch.tensor([9, 5, 1])
    padded = [rm(seqs[b:b + 1, :4 + n], 4) for b, n in enumerate(lengths.tolist())]  # each alone, unpadded
    assert torch.allclose(rm(seqs, 4, lengths), torch.cat(padded), atol=1e-5)
    long = torch.randint(0, 65, (2, 4 + 40))  # 40 > block_size 16: the last 16 are read
    assert torch.allclose(rm(long, 4), rm(long[:, -16:], 0), atol=1e-5)
    mixed = rm(long, 4, torch.tensor([6, 40]))  # a short answer padded beside a long one
    assert torch.allclose(mixed, torch.cat([rm(long[:1, :4 + 6], 4), rm(long[1:, -16:], 0)]), atol=1e-5)


# ======================================================================= labeler.py
def test_gold_score_on_hand_written_lines():
    assert gold_score('O sweet love, my gentle joy!') == 4
    assert gold_score('Death and blood, thou foul villain.') == -4
    assert gold_score('love love LOVE, Love.') == 1  # distinct words, any case
    assert gold_score('A lovely glove; undead.') == 0  # whole words only
    assert gold_score("Fair Juliet's love is death to me") == 2 - 1


def test_repeated_word_keeps_the_gold_and_only_one_word_answers():
    """The repetition yardstick: answers whose gold is one positive word said once get that word
    said n times, and gold still counts it once; other answers, and variants past room, are left out."""
    texts = ['Be merry, sir.', 'O love, sweet love', 'Go hence.', 'Thy death.', 'It is good to know it well']
    variants = repeated_word(texts, (1, 2, 4), room=45, n_max=10)
    assert [i for i, _ in variants] == [0, 4]  # one positive word, said once
    assert variants[0][1] == ['Be merry, sir.', 'Be merry merry, sir.', 'Be merry merry merry merry, sir.']
    for i, said in variants:
        assert [gold_score(s) for s in said] == [gold_score(texts[i])] * 3 == [1] * 3
    assert [i for i, _ in repeated_word(texts, (1, 8), room=60, n_max=10)] == [0]  # 8 goods: 61 > 60
    assert len(repeated_word(texts, (1, 2), room=45, n_max=1)) == 1


def test_repeats_a_word_on_hand_written_lines():
    assert repeats_a_word('Good love love love') and repeats_a_word('O Romeo, Romeo!')  # twice in a row
    assert repeats_a_word('Good love good love good love')  # a 4-letter word 3 times
    assert not repeats_a_word('the king, the queen, the prince') and not repeats_a_word('Good love, good day')


def test_labeler_choice_frequency_matches_bradley_terry():
    gen = torch.Generator().manual_seed(0)
    n = 40000
    for gi, gj, tau in [(1, 0, 1.0), (0, 0, 1.0), (-1, 1, 1.0), (2, 0, 2.5)]:
        freq = label(torch.full((n,), float(gi)), torch.full((n,), float(gj)), tau,
                     generator=gen).mean().item()
        p = 1 / (1 + math.exp(-(gi - gj) / tau))
        assert abs(freq - p) < 0.01, (gi, gj, tau, freq, p)
    assert abs(choice_prob(1, 0).item() - 0.731) < 1e-3  # a one-word lead wins ~73%


def test_all_pairs_once_each():
    for k in range(2, 8):
        i, j = all_pairs(k)
        pairs = list(zip(i.tolist(), j.tolist()))
        assert len(pairs) == k * (k - 1) // 2 == len(set(pairs)) and all(a < b for a, b in pairs)


def test_pair_metrics_on_hand_numbers():
    """ECE, prob_mae and the val, Bayes and gold accuracies of one prompt's three pairs, by hand."""
    # one prompt, three answers: q = sigmoid(r_i - r_j) = 0.25, 0.5, 0.75 for pairs (0,1), (0,2), (1,2)
    r, g = torch.tensor([[0.0, math.log(3), 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    y = torch.tensor([[0.0, 1.0, 1.0]])
    m = pair_metrics(r, g, y, 1.0)
    s1 = 1 / (1 + math.exp(-1))  # labeler's P for a one-word lead
    assert abs(m['ece'] - (0.25 + 0.5 + 0.25) / 3) < 1e-6  # one pair per bin: |q - y| each
    assert abs(m['prob_mae'] - 2 * (0.75 - s1) / 3) < 1e-6  # |0.25 - (1-s1)| + 0 + |0.75 - s1|
    assert abs(m['val_acc'] - 2 / 3) < 1e-6 and abs(m['bayes_acc'] - (2 * s1 + 0.5) / 3) < 1e-6
    assert m['gold_acc'] == 1.0  # both gold-different pairs ordered right


# ====================================================================== frontier.py
def test_a_policy_measured_against_itself_has_zero_kl():
    """measure_policy's KL is the exact sum over each answer of KL(pi || pi_ref) at every position:
    0 against itself, and against another model the sum worked out from the full distributions."""
    policy, ref, Tp = tiny_model(1), tiny_model(2), 4
    prompts = torch.randint(0, 65, (3, Tp), generator=torch.Generator().manual_seed(0))
    _, _, same = measure_policy(policy, policy, prompts, VOCAB, 6, [0], 1.0, 2, seed=0)
    assert torch.equal(same['kl'], torch.zeros(6))
    seqs, lengths, other = measure_policy(policy, ref, prompts, VOCAB, 6, [0], 1.0, 2, seed=0)
    for b in range(6):
        p, q = F.softmax(policy(seqs[b:b + 1])[0][0], -1), F.softmax(ref(seqs[b:b + 1])[0][0], -1)
        brute = sum((p[t] * (p[t] / q[t]).log()).sum() for t in range(Tp - 1, Tp - 1 + lengths[b]))
        assert abs(other['kl'][b].item() - brute.item()) < 1e-4
        ll = sum(q[t, seqs[b, t + 1]].log() for t in range(Tp - 1, Tp - 1 + lengths[b])) / lengths[b]
        assert abs(other['logp_ref'][b].item() - ll.item()) < 1e-4  # log pi_ref per answer character
    assert set(other) == {'gold', 'length', 'ended', 'kl', 'repeats', 'logp_ref'}
    assert torch.equal(other['length'], lengths.float()) and set(other['repeats'].tolist()) <= {0.0, 1.0}


def test_best_of_n_returns_the_reward_models_argmax():
    m = tiny_model()
    prompts = torch.randint(0, 65, (5, 4))
    stop = [VOCAB.index('e')]  # answers end at their first 'e'
    best, best_len, best_r, all_y, all_len, all_r = best_of_n(m, StubRM(), prompts, 8, 6, stop, 1.0,
                                                              torch.Generator().manual_seed(0))
    assert all_y.shape[:2] == (5, 8) and all_r.shape == (5, 8) and all_len.max() <= 6
    assert (all_len < 6).any() and (all_len == 6).any()  # some answers ended early, some ran out
    for p in range(5):
        k = all_r[p].argmax()
        assert torch.equal(best[p], all_y[p,
                                          k]) and best_r[p] == all_r[p].max() and best_len[p] == all_len[p, k]
        # each scored on its prompt + answer to its own end
        for k in range(8):
            last = all_y[p, k, all_len[p, k] - 1]
            assert abs(all_r[p, k] - (prompts[p, -1] + 0.01 * last + 1e-3 * all_len[p, k])) < 2e-5


def test_best_of_n_estimator_against_enumeration():
    """The order-statistics estimator equals the average, over every n-subset of the N samples,
    of the gold of the subset's RM favourite."""
    gen = torch.Generator().manual_seed(0)
    r, gold = torch.randn(3, 7, generator=gen), torch.randint(-2, 3, (3, 7), generator=gen).float()
    curve = best_of_n_curve(r, {'gold': gold}, [1, 2, 3, 5, 7])
    for n, point in curve.items():
        rm_n, gold_n = point['rm'], point['gold']
        for p in range(3):
            subsets = list(combinations(range(7), n))
            best = [max(s, key=lambda i: r[p, i].item()) for s in subsets]
            assert abs(gold_n[p].item() - sum(gold[p, i].item() for i in best) / len(subsets)) < 1e-9
            assert abs(rm_n[p].item() - sum(r[p, i].item() for i in best) / len(subsets)) < 1e-6
    assert torch.allclose(curve[1]['gold'], gold.double().mean(1))
    assert torch.allclose(curve[7]['rm'], r.double().max(1).values)


def test_gold_at_kl_interpolates_and_flags_extrapolation():
    curve = [{'kl': 0.0, 'gold': 0.1}, {'kl': 1.0, 'gold': 0.5}, {'kl': 2.0, 'gold': 0.7}]
    assert abs(gold_at_kl(curve, 0.5)[0] - 0.3) < 1e-12 and not gold_at_kl(curve, 0.5)[1]
    assert abs(gold_at_kl(curve, 1.5)[0] - 0.6) < 1e-12 and not gold_at_kl(curve, 1.5)[1]
    assert abs(gold_at_kl(curve, 3.0)[0] - 0.9) < 1e-12 and gold_at_kl(curve, 3.0)[1]


# =========================================================================== gpt.py
def test_lr_schedule_on_hand_numbers():
    """Warmup over 10 iterations, then linear or cosine decay over 100 to lr * min_ratio, held there."""
    assert get_lr(0, 1.0, 10, 110, 0.0, 'linear') == 0.1 and get_lr(9, 1.0, 10, 110, 0.0, 'linear') == 1.0
    assert abs(get_lr(60, 1.0, 10, 110, 0.0, 'linear') - 0.5) < 1e-12
    assert abs(get_lr(35, 1.0, 10, 110, 0.0, 'linear') - 0.75) < 1e-12
    assert get_lr(110, 1.0, 10, 110, 0.0, 'linear') == 0
    assert abs(get_lr(60, 1.0, 10, 110, 0.1, 'cosine') - 0.55) < 1e-12
    assert abs(get_lr(200, 1.0, 10, 110, 0.1, 'cosine') - 0.1) < 1e-12


def test_more_processes_than_gpus_is_one_line(monkeypatch, capsys):
    """torchrun --nproc_per_node=8 on a machine with one GPU: every rank stops with one MinibardError
    before any GPU is touched (rank 0 says it), not a CUDA traceback from set_device."""
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    for rank in ('0', '5'):
        monkeypatch.setattr(os, 'environ', dict(os.environ, RANK=rank, LOCAL_RANK=rank, WORLD_SIZE='8',
                                                LOCAL_WORLD_SIZE='8'))
        assert 'torchrun started 8 processes' in in_process_error(capsys, start_processes, 0, 'cuda')


def test_split_loss_weights_uneven_batches():
    """The whole-split loss is the mean over all windows, whatever the batches' sizes."""
    class MeanModel:  # "loss" = mean token id of the batch
        config = GPTConfig(block_size=4)

        def parameters(self):
            return iter([torch.zeros(1)])

        def __call__(self, x, y):
            return None, x.float().mean()
    data = torch.arange(43)  # 10 windows of 4 (+1 for the targets), batches of 3, 3, 3, 1
    assert abs(split_loss(MeanModel(), data, batch=3) - data[:40].float().mean().item()) < 1e-9


# =========================================================================== sft.py
def test_sft_loss_counts_the_answer_characters_only():
    """The masked cross-entropy against a loop over the answer positions by hand: the prompt's
    characters and the padding after each answer's end count for nothing."""
    model, Tp = tiny_model(1), 4
    seqs, lengths = torch.randint(0, 65, (3, Tp + 6),
                                  generator=torch.Generator().manual_seed(0)), torch.tensor([6, 2, 4])
    logits = model(seqs)[0]
    terms = [-F.log_softmax(logits[b, Tp + t - 1], -1)[seqs[b, Tp + t]]
             for b in range(3) for t in range(lengths[b])]
    loss = sft_loss(model, seqs, lengths, Tp)
    assert len(terms) == 12 and abs(loss.item() - sum(terms).item() / 12) < 1e-6
    padded = seqs.clone()
    padded[1, Tp + 2:], padded[2, Tp + 4:] = 7, 9  # other padding: the same loss
    assert abs(sft_loss(model, padded, lengths, Tp).item() - loss.item()) < 1e-6
    whole = F.cross_entropy(logits[:, Tp - 1:-1].reshape(-1, 65), seqs[:, Tp:].reshape(-1))  # all positions
    assert abs(whole.item() - loss.item()) > 1e-3  # (so the mask does something here)


def test_demonstrations_are_real_turns_the_labeler_likes():
    """Each demonstration is a prompt and the turn after it in the text, cut at its blank line or
    max_len, kept where gold >= min_gold: against a regex walk over the raw string."""
    text = open(os.path.join(HERE, 'input.txt')).read()[:60000]
    data = torch.tensor(encode(text, VOCAB))
    seqs, lengths = demonstrations(data, VOCAB, 16, 96, 1)
    expected = []
    for m in re.finditer(r'\n\n[^\n]+:\n', text):
        if m.end() >= 16:
            turn = text[m.end():].split('\n\n')[0] + '\n\n'  # the turn with its blank line
            if gold_score(turn[:96]) >= 1:
                expected.append(text[m.end() - 16:m.end()] + turn[:96])
    got = [decode(s[:16 + n], VOCAB) for s, n in zip(seqs.tolist(), lengths.tolist())]
    assert len(got) > 20 and got == expected
    assert len(demonstrations(data, VOCAB, 16, 96, 99)[0]) == 0  # none is that well liked


def test_copy_rate_by_hand():
    demos = ['To be, or not to be: that is the question', 'O Romeo, Romeo!']
    texts = ['I say: or not to be: that is all', 'O Romeo, wherefore', 'Romeo!', '']
    assert copy_rate(texts, demos, 12) == 1 / 4  # ' or not to be' is 13 characters
    assert copy_rate(texts, demos, 6) == 3 / 4 and copy_rate(texts, demos, 40) == 0


# ======================================================================== reward.py
def test_pairwise_loss_matches_hand_computation():
    r = torch.tensor([[1.0, 0.0, 2.0]])  # pairs (0,1), (0,2), (1,2)
    prefs = torch.tensor([[1.0, 0.0, 1.0]])  # winners: 0, 2, 1
    loss, acc = pairwise_loss(r, prefs)
    # -log sigmoid(r_w - r_l): margins 1 - 0, 2 - 1, 0 - 2
    hand = (math.log(1 + math.exp(-1)) * 2 + math.log(1 + math.exp(2))) / 3
    assert abs(loss.item() - hand) < 1e-6 and abs(acc.item() - 2 / 3) < 1e-6


def test_evaluate_bayes_limit_on_hand_case():
    g = torch.tensor([[0.0, 1.0, 1.0, 3.0]])  # gold of 4 responses
    seqs = g.long().view(1, 4, 1).repeat(1, 1, 3)  # the stub RM reads g back: r = g (+ tiny)
    prefs = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    m = evaluate_rm(StubRM(), Preferences(seqs, torch.full((1, 4), 2), g, prefs), 1, 1.0)
    s = lambda x: 1 / (1 + math.exp(-x))
    # pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3): gold diffs -1 -1 -3 0 -2 -2
    bayes = (s(1) + s(1) + s(3) + 0.5 + s(2) + s(2)) / 6
    assert abs(m['bayes_acc'] - bayes) < 1e-6
    assert m['gold_acc'] == 1.0  # r orders all 5 differing pairs like g
    # the (1,2) tie: r1 == r2 -> says j; label said i
    assert abs(m['val_acc'] - 5 / 6) < 1e-6


def test_bf16_training_keeps_attention_and_head_in_fp32():
    """reward.py's dtype='bfloat16' (CPU bf16 autocast around the training forward): the trunk's
    linear layers run in bf16, attention and the head in fp32, so the rewards come out fp32 and
    within bf16 rounding of the fp32 forward, and the gradient reaches every parameter; the dev
    evaluations of train_reward_model stay fp32."""
    torch.manual_seed(0)
    rm = RewardModel(TINY, context=2)
    torch.nn.init.normal_(rm.head.weight, std=0.3)
    seqs, lengths = torch.randint(0, 65, (4, 4 + 10)), torch.tensor([10, 7, 3, 1])
    ref = rm(seqs, 4, lengths)  # fp32 throughout
    seen = {}
    rm.trunk.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.update(qkv=o.dtype))
    rm.trunk.blocks[0].attn.proj.register_forward_hook(lambda m, i, o: seen.update(attention=i[0].dtype))
    rm.head.register_forward_hook(lambda m, i, o: seen.update(head=o.dtype))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        r = rm(seqs, 4, lengths)
    assert seen == {'qkv': torch.bfloat16, 'attention': torch.float32, 'head': torch.float32}
    assert r.dtype == torch.float32
    assert (r - ref).abs().max() < 0.02 * ref.abs().max(), (r, ref)
    r.sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in rm.parameters() if p is not rm.bias)
    # train_reward_model's dtype switches it: bf16 linear layers in its training steps only,
    # fp32 everywhere else
    gen = torch.Generator().manual_seed(0)
    g, (i, j) = torch.randn(2, 4), all_pairs(4)
    data = Preferences(torch.randint(0, 65, (2, 4, 9)), torch.full((2, 4), 8), g, label(g[:, i], g[:, j],
                                                                                        1.0, generator=gen))
    calls = []
    rm.trunk.blocks[1].attn.qkv.register_forward_hook(lambda m, i, o: calls.append((m.training, o.dtype)))
    for dtype in ('bfloat16', 'float32'):
        calls.clear()
        train_reward_model(rm.train(), data, data, 1, 1.0, 1e-3, 1, 1, 1, 1.0, gen, log=lambda s: None,
                           dtype=dtype)
        bf16 = torch.bfloat16 if dtype == 'bfloat16' else torch.float32
        assert {(True, bf16), (False, torch.float32)} == set(calls), (dtype, calls)


def test_tiny_reward_model_learns_a_toy_preference():
    """Preferences for sequences with more of character 'e': accuracy well above chance in seconds."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    e = VOCAB.index('e')
    def batch(P):
        seqs = torch.randint(0, 65, (P, 4, 12), generator=gen)
        seqs[torch.rand(seqs.shape, generator=gen) < 0.3] = e  # a random share of 'e'
        gold = (seqs == e).sum(-1).float()  # (P, K)
        i, j = all_pairs(4)
        return seqs, gold, label(gold[:, i], gold[:, j], 0.5, generator=gen)
    rm = RewardModel(TINY, context=1)
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    for _ in range(150):
        seqs, _, prefs = batch(16)
        loss, _ = pairwise_loss(rm(seqs.view(-1, 12), 1).view(16, 4), prefs)
        opt.zero_grad(); loss.backward(); opt.step()
    rm.eval()
    seqs, gold, prefs = batch(200)
    m = evaluate_rm(rm, Preferences(seqs, torch.full((200, 4), 11), gold, prefs), 1, 0.5)
    assert m['gold_acc'] > 0.8 and m['val_acc'] > m['bayes_acc'] - 0.1, m


def test_bag_of_words_recovers_a_planted_lexicon():
    """Synthetic answers of random words; the labeler likes w0..w9 and dislikes w10..w19. The
    reference learner, told nothing of that, finds them from the sampled labels alone."""
    gen = torch.Generator().manual_seed(0)
    vocab_w = [f'w{chr(97 + i // 26)}{chr(97 + i % 26)}' for i in range(200)]  # 'waa', 'wab', ...
    liked, disliked = set(vocab_w[:10]), set(vocab_w[10:20])

    def answers(P, K=4):
        texts = [' '.join(vocab_w[t] for t in torch.randint(0, 200, (8,),
                                                            generator=gen)) for _ in range(P * K)]
        gold = torch.tensor([float(len(set(t.split()) & liked) - len(set(t.split()) & disliked))
                             for t in texts]).view(P, K)
        i, j = all_pairs(K)
        return texts, gold, label(gold[:, i], gold[:, j], 1.0, generator=gen)
    texts, gold, prefs = answers(1500)
    index = {w: n for n, w in enumerate(vocab_w)}
    theta = fit_bow(bow_features(texts, index), prefs, len(index), 1e-4)
    neutral = theta[20:]  # every planted word stands clear of all 180 neutral ones
    assert theta[:10].min() > neutral.max() + 0.3 and theta[10:20].max() < neutral.min() - 0.3
    texts, gold, prefs = answers(200)
    r = bow_scores(theta, bow_features(texts, index)).view_as(gold)
    assert pair_metrics(r, gold, prefs, 1.0)['gold_acc'] > 0.95
    # by hand: each known word counts once (as the labeler counts), the weights are summed,
    # unknown words add 0
    w = torch.arange(1.0, 201.0)  # theta_waa = 1, theta_wab = 2, ...
    hand = bow_scores(w, bow_features(['waa waa wab', 'Wab! zzz', '', 'wac'], index))
    assert hand.tolist() == [1.0 + 2.0, 2.0, 0.0, 3.0]


def test_early_stopping_keeps_the_best_dev_checkpoint():
    """Train on 'more e is better' but score dev against the opposite: dev loss rises as the RM
    learns, so the state kept must be the first evaluated one, not the last."""
    gen = torch.Generator().manual_seed(0)
    e = VOCAB.index('e')

    def pairs(P, flip):
        seqs = torch.randint(0, 65, (P, 4, 12), generator=gen)
        seqs[torch.rand(seqs.shape, generator=gen) < 0.3] = e
        gold = (seqs == e).sum(-1).float() * (-1 if flip else 1)
        i, j = all_pairs(4)
        return Preferences(seqs, torch.full((P, 4), 11), gold, label(gold[:, i], gold[:, j], 0.5,
                                                                     generator=gen))
    torch.manual_seed(0)
    rm = RewardModel(TINY, context=1)
    dev = pairs(40, True)
    history = train_reward_model(rm, pairs(320, False), dev, 1, 0.5, 3e-3, 1, 16, 4, 1.0, gen,
                                 log=lambda s: None)
    losses = [m['loss'] for _, m in history]
    assert [s for s, _ in history] == [5, 10, 15, 20] and losses[0] == min(losses) < losses[-1] - 0.05
    assert abs(evaluate_rm(rm, dev, 1, 0.5)['loss'] - losses[0]) < 1e-6  # the kept state is that one


# =========================================================================== ppo.py
def test_gae_matches_naive_double_loop():
    torch.manual_seed(0)
    for _ in range(5):
        gamma, gae_lambda = torch.rand(2).tolist()
        rewards, values = torch.randn(3, 9), torch.randn(3, 9)
        adv, ret = gae(rewards, values, gamma, gae_lambda)
        v_next = torch.cat([values[:, 1:], torch.zeros(3, 1)], 1)
        delta = rewards + gamma * v_next - values
        naive = torch.zeros(3, 9)
        for t in range(9):  # A_t = sum_l (gamma lambda)^l delta_{t+l}
            for l in range(9 - t):
                naive[:, t] += (gamma * gae_lambda) ** l * delta[:, t + l]
        assert torch.allclose(adv, naive, atol=1e-5) and torch.allclose(ret, naive + values, atol=1e-5)


def test_clipped_surrogate_gradient():
    adv = torch.tensor([[1.0, -2.0, 0.5, -1.0]])
    old = torch.log(torch.tensor([[0.3, 0.2, 0.6, 0.1]]))
    zeros = torch.zeros(1, 4)
    # ratio 1: the gradient is the plain policy gradient, d/dlogp of -A pi/pi_old = -A / N
    new = old.clone().requires_grad_()
    pg, *_ = ppo_losses(new, old, adv, zeros, zeros, zeros, torch.ones(1, 4), 0.2, 0.2)
    pg.backward()
    assert torch.allclose(new.grad, -adv / 4)
    # ratio 1.5 with A > 0, ratio 0.5 with A < 0: the clip binds, no gradient; the others are pessimistic
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5]])
    new = (old + ratios.log()).requires_grad_()
    pg, _, clipfrac, _ = ppo_losses(new, old, adv, zeros, zeros, zeros, torch.ones(1, 4), 0.2, 0.2)
    pg.backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] == 0
    assert torch.allclose(new.grad[0, 2:], -adv[0, 2:] * ratios[0, 2:] / 4)
    assert clipfrac.item() == 1.0


def test_value_loss_is_clipped():
    old_v, ret = torch.zeros(1, 2), torch.tensor([[1.0, 1.0]])
    v = torch.tensor([[0.5, -0.5]], requires_grad=True)
    _, v_loss, _, _ = ppo_losses(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), v, old_v, ret,
                                 torch.ones(1, 2), 0.2, 0.2)
    # 1/2 mean(max((v - R)^2, (clip(v, -0.2, 0.2) - R)^2)): (0.8^2 vs 0.5^2) and (1.5^2 vs 1.2^2)
    assert abs(v_loss.item() - 0.5 * (0.8 ** 2 + 1.5 ** 2) / 2) < 1e-6
    v_loss.backward()
    assert v.grad[0, 0] == 0 and v.grad[0, 1] != 0  # clipped branch: no gradient


def test_explained_variance_over_the_answer_tokens_only():
    """1 - Var(R - V) / Var(R) over the real tokens: R = 1, 2, 3 and V = 1, 2, 2; padding ignored."""
    ev = explained_variance(torch.tensor([[1.0, 2.0, 2.0, 9.0]]), torch.tensor([[1.0, 2.0, 3.0, -5.0]]),
                            torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert abs(ev - (1 - (2 / 9) / (2 / 3))) < 1e-6


def test_per_token_rewards_put_the_score_on_each_answers_last_token():
    logp, ref = torch.randn(2, 5), torch.randn(2, 5)
    scores, mask = torch.tensor([3.0, -1.0]), torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2])  # lengths 5, 3
    r = per_token_rewards(scores, logp, ref, 0.1, mask)
    kl = -0.1 * (logp - ref)
    assert torch.allclose(r[0, :4], kl[0, :4]) and torch.allclose(r[0, 4], scores[0] + kl[0, 4])
    assert torch.allclose(r[1, :2], kl[1, :2]) and torch.allclose(r[1, 2], scores[1] + kl[1, 2])
    assert torch.equal(r[1, 3:], torch.zeros(2))  # nothing after the end


def test_padded_batch_equals_the_episodes_one_by_one():
    """Episodes of lengths 7, 3 and 5, padded to 7 with garbage: GAE, whitening and every loss are
    the same as computing each episode unpadded and pooling its tokens."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 3, 5])
    mask = (torch.arange(7) < lengths[:, None]).float()
    rand = lambda: torch.randn(3, 7, generator=gen)
    rewards, values, logp, old_logp, new_values = rand() * mask, rand() * mask, rand(), rand(), rand()
    adv, ret = gae(rewards, values, 1.0, 0.95)
    episodes = [gae(rewards[b:b + 1, :n], values[b:b + 1, :n], 1.0, 0.95) for b,
                n in enumerate(lengths.tolist())]
    for b, n in enumerate(lengths.tolist()):
        assert torch.allclose(adv[b, :n], episodes[b][0][0]) and torch.allclose(ret[b, :n], episodes[b][1][0])
    flat = lambda x: torch.cat([x[b, :n] for b, n in enumerate(lengths.tolist())])[None]  # the tokens, pooled
    w = whiten(adv, mask)
    assert torch.allclose(flat(w), (flat(adv) - flat(adv).mean()) / flat(adv).std(unbiased=False), atol=1e-5)
    assert (w[mask == 0] == 0).all()
    padded = ppo_losses(logp, old_logp, w, new_values, values, ret, mask, 0.2, 0.2)
    pooled = ppo_losses(*(flat(x) for x in (logp, old_logp, w, new_values, values, ret)), torch.ones(1, 15),
                        0.2, 0.2)
    for a, b in zip(padded, pooled):
        assert torch.allclose(a, b, atol=1e-6)


def test_group_advantages_against_a_naive_loop():
    """RLOO: each answer's return less the mean of the other G - 1 of its prompt (a loop over the
    answers), summing to 0 in each group; GRPO: the group's mean off and its std as the scale."""
    R = torch.randn(3 * 4, generator=torch.Generator().manual_seed(0))
    rloo = group_advantages(R, 4)
    for p in range(3):
        for i in range(4):
            others = [R[4 * p + j].item() for j in range(4) if j != i]
            assert abs(rloo[4 * p + i].item() - (R[4 * p + i].item() - sum(others) / 3)) < 1e-6
    assert torch.allclose(rloo.view(3, 4).sum(1), torch.zeros(3), atol=1e-6)
    grpo = group_advantages(R, 4, scale=True).view(3, 4)
    for p in range(3):
        g = R[4 * p:4 * p + 4]
        mean = sum(g.tolist()) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in g.tolist()) / 3)
        assert torch.allclose(grpo[p], (g - mean) / std, atol=1e-5)


def test_group_baseline_on_padded_answers():
    """With a group baseline every character of an answer gets its answer's advantage and the
    padding none: the clipped loss of a padded batch is that of its real tokens, pooled."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([7, 3, 5, 2])
    mask = (torch.arange(7) < lengths[:, None]).float()
    rewards = torch.randn(4, 7, generator=gen) * mask
    adv = group_advantages(rewards.sum(1), 2)[:, None] * mask
    assert (adv[mask == 0] == 0).all() and torch.allclose(adv[0, :7], adv[0, 0].expand(7))
    # G = 2: the other one
    assert abs(adv[0, 0].item() - (rewards[0].sum() - rewards[1].sum()).item()) < 1e-5
    logp, old = torch.randn(4, 7, generator=gen), torch.randn(4, 7, generator=gen)
    zeros = torch.zeros(4, 7)
    flat = lambda x: torch.cat([x[b, :n] for b, n in enumerate(lengths.tolist())])[None]
    padded = ppo_losses(logp, old, adv, zeros, zeros, zeros, mask, 0.2, 0.2)
    pooled = ppo_losses(flat(logp), flat(old), flat(adv), *(flat(zeros),) * 3, torch.ones(1, 17), 0.2, 0.2)
    for a, b in zip(padded, pooled):
        assert torch.allclose(a, b, atol=1e-6)


def test_adaptive_kl_controller_hand_numbers():
    c = AdaptiveKLController(0.1, 6.0, 10000)
    assert abs(c.update(9.0, 64) - 0.1 * (1 + 0.2 * 64 / 10000)) < 1e-12  # error 0.5 clipped to 0.2
    c = AdaptiveKLController(0.1, 6.0, 10000)
    assert abs(c.update(5.4, 100) - 0.1 * (1 - 0.1 * 100 / 10000)) < 1e-12  # error -0.1
    c = AdaptiveKLController(0.1, 6.0, 10000)
    assert abs(c.update(0.0, 100) - 0.1 * (1 - 0.2 * 100 / 10000)) < 1e-12  # error -1 clipped to -0.2
    assert AdaptiveKLController(0.1, 0.0, 10000).update(50.0, 100) == 0.1  # target 0: fixed


def test_kl_controller_moves_beta_within_a_default_run():
    """With ppo.py's defaults, a KL held at twice the target raises beta by a third over the run,
    and a KL far below it lowers beta by a quarter (the old horizon of 10,000 x 64 moved it 4%)."""
    for kl, lo, hi in [(2 * ppo.kl_target, 1.3, 1.5), (0.0, 0.6, 0.75)]:
        c = AdaptiveKLController(ppo.init_kl_coef, ppo.kl_target, ppo.kl_horizon)
        for _ in range(ppo.max_iters):
            c.update(kl, ppo.batch_size)
        assert lo < c.beta / ppo.init_kl_coef < hi, (kl, c.beta)


def test_exact_kl_and_sampled_estimators():
    torch.manual_seed(0)
    lp, lq = torch.randn(65), torch.randn(65)
    p, q = F.softmax(lp, -1), F.softmax(lq, -1)
    brute = sum(p[v] * math.log(p[v] / q[v]) for v in range(65))
    assert abs(exact_kl(lp, lq).item() - brute) < 1e-5
    assert abs(exact_kl(lp, lq, temperature=0.7).item()
               - (F.softmax(lp / 0.7, -1) * (F.log_softmax(lp / 0.7, -1) - F.log_softmax(lq / 0.7,
                                                                                         -1))).sum()) < 1e-5
    x = torch.multinomial(p, 400000, replacement=True, generator=torch.Generator().manual_seed(0))
    k1, k3 = kl_estimates(torch.log(p[x]), torch.log(q[x]))
    assert abs(k1.mean().item() - brute) < 0.03 * brute + 0.01
    assert abs(k3.mean().item() - brute) < 0.03 * brute + 0.01 and (k3 >= 0).all()


TINY_PPO_OPTIONS = dict(  # ppo.train's args for a tiny in-process run
    prompt_len=4, max_answer_len=12, truncation_penalty=0.0, temperature=1.0, advantage='gae', group_size=1,
    learning_rate=3e-3, critic_lr=1e-4, init_kl_coef=0.01, kl_target=0.0, kl_horizon=10000, seed=0,
    max_iters=25,
    batch_size=64, forward_batch_size=64, gamma=1.0, gae_lambda=0.95, update_epochs=2, num_minibatches=2,
    clip_coef=0.2, cliprange_value=0.2, vf_coef=0.1, ent_coef=0.0, ptx_coef=0.0, max_grad_norm=1.0)


def test_tiny_ppo_raises_a_toy_reward():
    """Reward = share of 'e' in the turn: a few PPO iterations from a random tiny GPT raise it.
    Turns end at a ':' (about 1 in 65 characters), so episodes have different lengths."""
    torch.manual_seed(0)
    e = VOCAB.index('e')
    policy, ref = tiny_model(1), tiny_model(1)
    critic = Critic(RewardModel(TINY, context=4))
    reward_fn = lambda seqs, n: ((seqs[:, 4:] == e).float() * answer_mask(n,
                                                                          seqs.size(1) - 4)).sum(1) / n * 10
    gen = torch.Generator().manual_seed(0)
    hist = ppo_train(policy, ref, critic, reward_fn, lambda b: torch.randint(0, 65, (b, 4), generator=gen),
                     [VOCAB.index(':')], SimpleNamespace(**TINY_PPO_OPTIONS), log=lambda s: None)
    first, last = hist[0]['reward'], sum(h['reward'] for h in hist[-3:]) / 3
    assert last > 3 * first and last > 1.0, (first, last)
    assert all(math.isfinite(h['kl']) and h['kl'] >= 0 for h in hist) and 0.05 < hist[0]['ended'] < 1


def test_ppo_ptx_adds_the_language_model_loss():
    """PPO-ptx (InstructGPT eq. 2): with ptx_coef > 0 every minibatch step also takes an LM batch,
    and the policy moves towards it: a pretraining set that is all 'e' raises P('e')."""
    torch.manual_seed(0)
    e, calls = VOCAB.index('e'), []
    policy, ref = tiny_model(2), tiny_model(2)
    def lm_batch():
        calls.append(1)
        return torch.full((8, 16), e), torch.full((8, 16), e)  # inputs and next characters
    p_e = lambda: F.softmax(policy(torch.full((1, 4), e))[0][0, -1], -1)[e].item()
    before = p_e()
    gen = torch.Generator().manual_seed(0)
    options = dict(TINY_PPO_OPTIONS, max_answer_len=8, critic_lr=0.0, init_kl_coef=0.0, max_iters=3,
                   batch_size=8,
                   # only the LM loss moves the policy
                   forward_batch_size=8, vf_coef=0.0, ptx_coef=1.0)
    ppo_train(policy, ref, Critic(RewardModel(TINY, context=4)), lambda s, n: torch.zeros(len(s)),
              lambda b: torch.randint(0, 65, (b, 4), generator=gen), [VOCAB.index(':')],
              SimpleNamespace(**options), lm_batch_fn=lm_batch, log=lambda s: None)
    assert len(calls) == 3 * 2 * 2 and p_e() > before + 0.1, (len(calls), before, p_e())


def test_rm_initialised_critic_gives_each_character_its_share():
    """With the critic = the RM's running score, GAE's TD errors are each character's share of the
    score, read off the RM on prefixes (it is causal): delta_t = r(x, y_<=t) - r(x, y_<t), up to each
    answer's own end, whatever its length."""
    torch.manual_seed(0)
    rm = RewardModel(TINY, context=4).eval()
    torch.nn.init.normal_(rm.head.weight, std=0.3)
    rm.bias.data.fill_(0.6)
    seqs, lengths = torch.randint(0, 65, (3, 16)), torch.tensor([12, 7, 1])
    mask = answer_mask(lengths, 12)
    with torch.no_grad():
        values = Critic(rm)(seqs, 4) * mask  # (3, 12)
        score = rm(seqs, 4, lengths)
        # (3, 13)
        prefix = torch.stack([rm(seqs[:, :4 + t], 4) if t else rm.bias.expand(3) for t in range(13)], 1)
    zeros = torch.zeros(3, 12)
    # lambda 0: A_t = delta_t
    adv, _ = gae(per_token_rewards(score, zeros, zeros, 0.1, mask), values, 1.0, 0.0)
    assert torch.allclose(values, prefix[:, :12] * mask, atol=1e-5)
    assert torch.allclose(adv, (prefix[:, 1:] - prefix[:, :12]) * mask, atol=1e-5)


# =========================================================================== dpo.py
def test_dpo_loss_by_hand_and_log_2_at_the_reference():
    logp, ref = torch.tensor([[-10.0, -12.0, -11.0]]), torch.tensor([[-11.0, -11.0, -11.0]])
    # pairs (0,1) 0 won, (0,2) 2 won, (1,2) 2 won
    prefs = torch.tensor([[1.0, 0.0, 0.0]])
    h = [1.0, -1.0, 0.0]  # log pi - log pi_ref
    margins = [h[0] - h[1], h[2] - h[0], h[2] - h[1]]  # h_w - h_l of each pair
    by_hand = sum(-math.log(1 / (1 + math.exp(-0.5 * m))) for m in margins) / 3
    loss, acc = dpo_loss(logp, ref, prefs, 0.5)
    assert abs(loss.item() - by_hand) < 1e-6 and abs(acc.item() - 2 / 3) < 1e-6
    assert abs(dpo_loss(ref, ref, prefs, 0.5)[0].item() - math.log(2)) < 1e-7  # pi = pi_ref: log 2
    # summed answer log-probs skip the padding
    model, Tp = tiny_model(1), 4
    seqs, lengths = torch.randint(0, 65, (2, Tp + 5),
                                  generator=torch.Generator().manual_seed(0)), torch.tensor([5, 2])
    logits = model(seqs)[0]
    hand = [sum(F.log_softmax(logits[b, Tp + t - 1], -1)[seqs[b, Tp + t]] for t in range(lengths[b]))
            for b in range(2)]
    assert torch.allclose(answer_logprobs(model, seqs, lengths, Tp), torch.stack(hand), atol=1e-5)


# ============================================================== expert_iteration.py
def test_expert_iteration_keeps_each_prompts_best_answer_above_the_threshold():
    """keep_best against a naive loop over each prompt's n answers, scored by hand as StubRM scores
    them: the RM's favourite (the first of equals) after its own prompt, kept only where its score
    is above the threshold (none: every prompt's)."""
    model, Tp, n, P = tiny_model(), 4, 6, 9
    prompts = torch.randint(0, 65, (P, Tp), generator=torch.Generator().manual_seed(0))
    stop = [VOCAB.index('e')]  # answers end at their first 'e'
    *_, y, lengths, r = best_of_n(model, StubRM(), prompts, n, 6, stop, 1.0,
                                  torch.Generator().manual_seed(0))  # (P, n, Ta), (P, n), (P, n)
    hand = [[prompts[p, -1].item() + 0.01 * y[p, k, lengths[p, k] - 1].item() + 1e-3 * lengths[p, k].item()
             for k in range(n)] for p in range(P)]
    favourite = []
    for p in range(P):
        best = 0
        for k in range(1, n):
            if hand[p][k] > hand[p][best] + 1e-6:
                best = k
        favourite.append(best)
    middle = sorted(hand[p][favourite[p]] for p in range(P))[P // 2]
    for threshold in (None, middle):
        seqs, kept_lengths, kept_scores = keep_best(prompts, y, lengths, r, threshold)
        expected = [p for p in range(P) if threshold is None or hand[p][favourite[p]] > threshold]
        assert len(seqs) == len(kept_lengths) == len(kept_scores) == len(expected) > 0
        for row, p in enumerate(expected):
            k = favourite[p]
            assert torch.equal(seqs[row], torch.cat([prompts[p], y[p, k]]))
            assert kept_lengths[row] == lengths[p, k]
            assert abs(kept_scores[row].item() - hand[p][k]) < 1e-4
    assert len(expected) < P  # (the threshold left some out)


def test_a_round_with_n_1_is_self_distillation_and_barely_moves_the_policy():
    """n = 1 keeps every answer the policy sampled, whatever the RM says: a round trains the policy
    on its own samples, and its exact KL to the start stays near 0. The same round on the best of 8
    moves it many times as far: what moves the policy is the RM's pick (answers of one character,
    which StubRM prefers late in the vocabulary)."""
    prompts = torch.randint(0, 65, (512, 4), generator=torch.Generator().manual_seed(0))
    held_out = torch.randint(0, 65, (32, 4), generator=torch.Generator().manual_seed(1))
    stop, kl = [0], {}
    for n in (1, 8):
        start, model = tiny_model(1), tiny_model(1)
        *_, y, lengths, r = best_of_n(model, StubRM(), prompts, n, 1, stop, 1.0,
                                      torch.Generator().manual_seed(0))  # answers of one character
        seqs, kept_lengths, _ = keep_best(prompts, y, lengths, r, None)
        if n == 1:  # the plain samples of the policy, as generate() draws them
            assert torch.equal(seqs, model.generate(prompts, 1, generator=torch.Generator().manual_seed(0),
                                                    stop=stop)[0])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        losses, val_log = fine_tune(model, opt, seqs, kept_lengths, 4, 16, 128, 1.0,
                                    torch.Generator().manual_seed(0))
        assert len(losses) == 16 and val_log == [] and all(map(math.isfinite, losses))
        kl[n] = measure_policy(model, start, held_out, VOCAB, 1, stop, 1.0, 4, seed=0)[2]['kl'].mean().item()
    assert 0 < kl[1] < 0.06 and kl[8] > 5 * kl[1], kl


def test_expert_iteration_trains_on_the_answer_characters_only():
    """fine_tune's first loss (one batch of every kept answer, before the step) is the mean of -log pi
    over the answer characters by hand, not over the prompt's or the padding's; other padding after
    the answers gives the same loss and the same step; another answer character, another loss."""
    model, Tp = tiny_model(1), 4
    seqs = torch.randint(0, 65, (3, Tp + 6), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([6, 2, 4])

    def first_step(seqs):  # -> (the first loss, the model after one step)
        m = tiny_model(1)  # the same weights as model
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
        return fine_tune(m, opt, seqs, lengths, Tp, 1, 8, 1.0, torch.Generator().manual_seed(0))[0][0], m

    logp = F.log_softmax(model(seqs)[0], -1)
    term = lambda b, t: -logp[b, t - 1, seqs[b, t]].item()  # -log pi(x_t | x_<t)
    answers = [term(b, Tp + t) for b in range(3) for t in range(lengths[b])]
    prompt = [term(b, t) for b in range(3) for t in range(1, Tp)]
    padding = [term(b, Tp + t) for b in range(3) for t in range(lengths[b], 6)]
    loss, stepped = first_step(seqs)
    assert abs(loss - sum(answers) / 12) < 1e-5
    assert abs(loss - sum(answers + prompt) / (12 + 3 * (Tp - 1))) > 1e-3  # (were the prompt counted)
    assert abs(loss - sum(answers + padding) / 18) > 1e-3  # (were the padding counted)
    padded = seqs.clone()
    padded[1, Tp + 2:], padded[2, Tp + 4:] = 7, 9  # other padding
    loss2, stepped2 = first_step(padded)
    assert abs(loss2 - loss) < 1e-6
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(stepped.parameters(), stepped2.parameters()))
    changed = seqs.clone()
    changed[1, Tp + 1] = (changed[1, Tp + 1] + 1) % 65  # an answer character
    assert abs(first_step(changed)[0] - loss) > 1e-4


def test_expert_iteration_early_stops_each_round_at_its_lowest_held_aside_loss():
    """With held-aside answers, fine_tune measures their loss before the first step, every
    val_interval steps and after the last, each the mean of -log pi over their answer characters by
    hand; it leaves the model and AdamW as a plain run of the best step's length leaves them (random
    answers at a high lr: the held-aside loss dips once and then climbs)."""
    Tp, g = 4, torch.Generator().manual_seed(0)
    seqs, lengths = torch.randint(0, 65, (16, Tp + 8), generator=g), torch.randint(1, 9, (16,), generator=g)
    val = torch.randint(0, 65, (8, Tp + 8), generator=g), torch.randint(1, 9, (8,), generator=g)

    def run(steps, val=None, interval=4):  # -> (model, optimizer, losses, val_log)
        m = tiny_model(1)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
        return (m, opt, *fine_tune(m, opt, seqs, lengths, Tp, steps, 4, 1.0, torch.Generator().manual_seed(0),
                                   val, interval))

    def by_hand(m):  # -1/N sum_b sum_{t < len_b} log pi(y_{b,t} | ...) over the held-aside answers
        v, vl = val
        logp = F.log_softmax(m(v)[0], -1)
        terms = [-logp[b, Tp + t - 1, v[b, Tp + t]].item() for b in range(len(v)) for t in range(vl[b])]
        return sum(terms) / len(terms)

    model, opt, losses, log = run(40, val)
    assert len(losses) == 40 and [s for s, _ in log] == list(range(0, 41, 4))
    assert abs(log[0][1] - by_hand(tiny_model(1))) < 1e-5
    best_step, low = min(log, key=lambda v: v[1])
    assert 0 < best_step < 40 and low < log[0][1] and log[-1][1] > low + 0.05, log  # (a dip, then a climb)
    plain, plain_opt, plain_losses, plain_log = run(best_step)
    assert plain_log == [] and plain_losses == losses[:best_step]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    assert all(torch.equal(opt.state[p]['exp_avg'], plain_opt.state[q]['exp_avg'])
               for p, q in zip(model.parameters(), plain.parameters()))
    assert abs(by_hand(model) - low) < 1e-5
    assert [s for s, _ in run(10, val)[3]] == [0, 4, 8, 10]  # and after the last step


def test_expert_iteration_stage_puts_its_rounds_on_the_frontier(runs):
    """A tiny run beside PPO's: exit 0, its json with a path of rounds + 1 points from the reference
    (KL 0), the checkpoint a GPT that loads and moved, and its points in that folder's frontier.csv."""
    code, log = runs['roads_ei']
    assert code == 0 and 'Traceback' not in log, log
    d = runs.dirs['roads_ei']
    m = json.load(open(os.path.join(d, 'expert_iteration.json')))
    assert m['rounds'] == 2 and m['policy'] == m['reference'] == 'sft.pt' and m['n'] == 4
    assert [r['step'] for r in m['path']] == [0, 1, 2]
    assert {r['method'] for r in m['path']} == {'expert_iteration'}
    assert m['path'][0]['kl'] == 0 and all(r['kl'] > 0 for r in m['path'][1:])
    assert m['eval']['expert_iteration']['gold'] == m['path'][-1]['gold']
    assert [k['kept'] for k in m['kept']] == [8, 8] and all(k['rm_kept'] >= k['rm_all'] for k in m['kept'])
    assert 'round 2/2 (100%): kept 8/8' in log and 'eval 2: gold' in log and 'seconds ' in log
    assert all([s for s, _ in k['val_loss']] == [0, 2, 3] and k['best_step'] in (0, 2, 3) for k in m['kept'])
    assert 'early-stopped on 4 held-aside prompts' in log and log.count('held-aside loss') == 2
    model, _, ck = load_gpt(os.path.join(d, 'expert_iteration.pt'))
    sft, _, _ = load_gpt(os.path.join(d, 'sft.pt'))
    assert ck['iter_num'] == 2 and ck['budget'] == 2 * 3 * 4  # rounds x steps x batch
    assert set(ck['made_from']) == {'sft.pt', 'reward.pt'}
    assert ck['metrics']['path'] == m['path'] and ck['model_args']['dropout'] == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), sft.state_dict().values()))
    rows = list(csv.DictReader(open(os.path.join(d, 'frontier.csv'))))
    assert sum(r['method'] == 'expert_iteration' for r in rows) == 3


def test_expert_iteration_stops_on_a_nan_loss_without_overwriting(runs, run_here, tmp_path):
    """A diverged fine-tuning (lr 1e30): one `error:` line naming the step and the option, and the
    checkpoint and json a run wrote before as they were."""
    assert runs['roads_ei'][0] == 0
    d = copy_ckpts(runs.dirs['roads_ei'], tmp_path, 'sft.pt', 'reward.pt', 'expert_iteration.pt',
                   'expert_iteration.json')
    before = {f: open(os.path.join(d, f), 'rb').read() for f in os.listdir(d)}
    code, log = run_here('expert_iteration.py', f'--out_dir={d}', *TINY_EI, '--learning_rate=1e30')
    assert_one_clear_line(code, log, 'loss is nan at step', 'of round 1', 'was not written',
                          '--learning_rate')
    assert {f: open(os.path.join(d, f), 'rb').read() for f in before} == before


# ======================================================================== sample.py
def chat_models():
    """A tiny GPT that can hold a short scene and a reward model on its trunk (random head)."""
    config = GPTConfig(block_size=64, vocab_size=65, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    rm = RewardModel(config).eval()
    torch.nn.init.normal_(rm.head.weight, std=0.3)
    return GPT(config).eval(), rm


def test_reply_scores_exactly_what_it_shows():
    model, rm = chat_models()
    stop = encode('\n\n', VOCAB)
    turns = [('ROMEO', 'Good morrow.')]
    for best_of in (1, 3):
        a = reply(model, rm, VOCAB, turns, 'JULIET', 12, stop, torch.Generator().manual_seed(best_of),
                  best_of)
        prompt = format_chat(turns, 'JULIET', 64 - 12 - 2)
        with torch.no_grad():
            said = torch.tensor([encode(prompt + a['answer'] + '\n\n', VOCAB)])
            r = rm_scores(rm, said, len(prompt)).item()
        assert a['rm'] == pytest.approx(r, abs=1e-5) and a['p'] == pytest.approx(1 / (1 + math.exp(-r)))
        assert '\n\n' not in a['answer'] and a['cut'] == bool(a['note']) and a['answer'].strip()
        assert not a['cut'] or a['note'].startswith('cut at 12 characters')


def test_web_page_and_chat_answers_and_refuses_bad_requests():
    """sample.py --mode=web's server, in-process on a free port: the page, answers through HTTP,
    a 4xx and one clear line for each bad request (and the next good one answered), 20 requests
    from 4 clients at once, a clean stop."""
    model, rm = chat_models()
    stop, gen = encode('\n\n', VOCAB), torch.Generator().manual_seed(0)
    chat = lambda turns, n: reply(model, rm, VOCAB, turns, 'JULIET', 12, stop, gen, n)
    server = make_server('127.0.0.1', 0, chat, VOCAB, 'ROMEO', 'JULIET', model='x</script><b>', quiet=True,
                         wait=1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def ask(method, path, body=None, headers=None):
        c = http.client.HTTPConnection('127.0.0.1', server.server_address[1], timeout=30)
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        c.request(method, path, data, headers or {})
        r = c.getresponse()
        out = r.read().decode()
        c.close()
        return r.status, r.getheader('Content-Type'), out
    try:
        status, kind, page = ask('GET', '/')
        assert status == 200 and kind.startswith('text/html') and '<form' in page and 'textContent' in page
        # nothing fetched
        assert 'x</script>' not in page and 'x\\u003c/script>' in page and 'src=' not in page
        status, _, out = ask('POST', '/chat', {'history': [{'who': 'you', 'text': 'Hi.'},
                                                          {'who': 'bard', 'text': 'Ay.'}], 'line': 'Go on.'})
        a = json.loads(out)
        assert status == 200 and 0 <= a['p'] <= 1 and a['line'] == 'Go on.' and isinstance(a['answer'], str)
        assert set(a) == {'answer', 'p', 'rm', 'seconds', 'cut', 'note', 'line'}
        status, _, out = ask('POST', '/chat', {'line': 'Hé <script>x</script>', 'best_of': 2})
        assert status == 200 and "knows no '/<>é'" in json.loads(out)['note']
        assert json.loads(out)['line'] == 'H scriptxscript'
        bad = [('POST', '/chat', b'not json', 400, 'not JSON'),
               ('POST', '/chat', {'line': '   '}, 400, 'empty'),
               ('POST', '/chat', {'line': 'a' * 501}, 400, 'at most 500'),
               ('POST', '/chat', {'line': 'éé'}, 400, 'knows none'),
               ('POST', '/chat', {'line': 'Hi', 'best_of': 0}, 400, 'best_of'),
               ('POST', '/chat', {'line': 'Hi', 'best_of': True}, 400, 'best_of'),
               ('POST', '/chat', {'line': 'Hi', 'history': [{'who': 'god', 'text': 'x'}]}, 400, 'history'),
               ('POST', '/chat', [1, 2], 400, '"line"'),
               ('POST', '/chat', b'{"line": "' + b'a' * 70000 + b'"}', 413, 'at most 65536'),
               ('GET', '/../etc/passwd', None, 404, 'no page'),
               ('GET', '/chat.html', None, 404, 'no page'),
               ('POST', '/', {'line': 'Hi'}, 404, 'use /chat'),
               ('PUT', '/chat', b'{}', 405, 'PUT is not answered'),
               ('DELETE', '/', None, 405, 'DELETE is not answered')]
        for method, path, body, code, words in bad:
            status, kind, out = ask(method, path, body)
            error = json.loads(out)['error']
            assert status == code and words in error and '\n' not in error, \
                (method, path, status, out)
            # and the next good one is answered
            assert ask('POST', '/chat', {'line': 'Speak.'})[0] == 200
        def raw(request):  # what a client sends, byte for byte: -> the status line and the body
            with socket.create_connection(('127.0.0.1', server.server_address[1]), timeout=30) as c:
                c.sendall(request)
                reply = b''.join(iter(lambda: c.recv(65536), b'')).decode()
            return reply.split('\r\n')[0], reply.split('\r\n\r\n', 1)[-1]
        port = server.server_address[1]
        odd = [(b'GET / HTTP/9.9\r\n\r\n', '505'), (b'GARBAGE\r\n\r\n', '400'),
               (b'TRACE / HTTP/1.1\r\nHost: localhost\r\n\r\n', '405'),
               (b'CONNECT x:1 HTTP/1.1\r\n\r\n', '405'), (b'BREW /pot HTTP/1.1\r\n\r\n', '405'),
               (b'POST /chat HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"line"', '408'),  # never comes
               (b'POST /chat HTTP/1.1\r\nContent-Length: 200000\r\n\r\n' + b'[' * 200000, '413'),
               (b'POST /chat HTTP/1.1\r\nContent-Length: 60000\r\n\r\n' + b'[' * 60000, '400'),  # deep
               (b'GET / HTTP/1.1\r\nHost: evil.example:8000\r\n\r\n', '403'),  # DNS rebinding
               (b'GET / HTTP/1.1\r\nHost: [::1]:%d\r\n\r\n' % port, '200'),
               (b'GET / HTTP/1.1\r\nHost: localhost:%d\r\n\r\n' % port, '200')]
        for request, status in odd:
            line, body = raw(request)
            assert line.split()[1] == status, (request[:40], line, body[:200])
            if status != '200':
                error = json.loads(body)['error']
                assert error and '\n' not in error, (request[:40], body)
        assert ask('POST', '/chat', {'line': 'Speak.'})[0] == 200  # and it still answers
        with ThreadPoolExecutor(max_workers=4) as pool:  # 4 clients, 20 requests
            answers = list(pool.map(lambda i: ask('POST', '/chat', {'line': f'Line {i}.',
                                                                    'best_of': 1 + i % 3}),
                                    range(20)))
        assert [a[0] for a in answers] == [200] * 20 and all(0 <= json.loads(a[2])['p'] <= 1 for a in answers)
    finally:
        server.shutdown()
        server.server_close()
    thread.join(timeout=10)
    assert not thread.is_alive()


# ======== the tiny pipeline, end to end (fixture runs: stage runs in the background)
def test_tiny_training_lowers_loss(runs):
    code, log = runs['gpt']
    assert code == 0, log
    first = float(log.split('step 0: ')[1].split('val loss ')[1].split('\n')[0])
    metrics = json.load(open(os.path.join(runs.dirs['out'], 'gpt.json')))
    assert set(metrics) == {'val_loss', 'train_loss', 'iters', 'seconds', 'params', 'tokens_per_sec',
                            'device',
                            'processes'} and metrics['processes'] == 1
    assert first > 4.0 and metrics['val_loss'] < first - 1.0, (first, metrics)


def test_sft_stage_keeps_its_lowest_held_out_loss(runs):
    code, log = runs['sft']
    assert code == 0, log
    m = json.load(open(os.path.join(runs.dirs['out'], 'sft.json')))
    for key in ['demos', 'val_loss', 'gold', 'gold_se', 'gold_pretrained', 'kl_to_pretrained', 'copy_rate',
                'seconds']:
        assert key in m, key
    losses = {int(l.split()[1][:-1]): float(l.split('loss ')[1].split()[0])
              for l in log.splitlines() if l.startswith('step ')}
    assert 0 in losses and m['best_step'] == min(losses, key=losses.get)
    assert m['val_loss'] == round(min(losses.values()), 4)
    assert m['kl_to_pretrained'] >= 0 and 0 <= m['copy_rate'] <= 1 and 'iter 5/15' in log
    model, vocab, ck = load_gpt(os.path.join(runs.dirs['out'], 'sft.pt'))  # loads wherever gpt.pt does
    assert vocab == VOCAB and ck['iter_num'] == m['best_step'] and ck['metrics']['demos'] == m['demos']
    gpt_args = torch.load(os.path.join(runs.dirs['out'], 'gpt.pt'), weights_only=True)['model_args']
    assert gpt_args['dropout'] == 0.1 and ck['model_args']['dropout'] == 0.0  # SFT's own dropout


def test_sft_stops_where_training_diverged(runs):
    """--learning_rate=1e6: the held-out loss is no number, or no step lowers it: one line that says so,
    never a silent sft.pt that is the pretrained model."""
    code, log = runs['sft_diverged']
    assert 'Traceback' not in log and 'learning_rate' in log, log
    assert_one_clear_line(code, log, 'is nan', 'sft.pt was not written')
    assert not os.path.exists(os.path.join(runs.dirs['sft_diverged'], 'sft.pt'))


def test_the_road_without_sft_is_one_flag_away(runs):
    """--policy=gpt.pt gives what a pipeline gets whose SFT step moved nothing (sft.pt = gpt.pt):
    the policy flag is all that separates the roads; PPO then starts from, and keeps its KL to,
    the pretrained model."""
    for name in ['reward_no_sft', 'ppo_no_sft', 'reward_sft_copy']:
        assert runs[name][0] == 0, runs[name][1]
    load = lambda name, f: json.load(open(os.path.join(runs.dirs[name], f)))
    drop = lambda m, *keys: {k: v for k, v in m.items() if k not in keys}
    plain, copied = load('reward_no_sft', 'reward.json'), load('reward_sft_copy', 'reward.json')
    assert plain['policy'] == 'gpt.pt' and copied['policy'] == 'sft.pt'
    assert drop(plain, 'policy', 'seconds') == drop(copied, 'policy', 'seconds')
    ppo = load('ppo_no_sft', 'ppo.json')
    assert ppo['policy'] == ppo['reference'] == 'gpt.pt' and ppo['path'][0]['kl'] == 0 < ppo['path'][-1]['kl']
    assert 'note:' not in runs['ppo_no_sft'][1]  # reward.pt learnt from gpt.pt's answers


def test_reward_stage_writes_its_metrics(runs):
    code, log = runs['reward']
    assert code == 0, log
    m = json.load(open(os.path.join(runs.dirs['out'], 'reward.json')))
    assert m['policy'] == 'sft.pt'
    for key in ['pairs_train', 'pairs_val', 'val_acc', 'bayes_acc', 'gold_acc', 'ece', 'prob_mae',
                'bow_val_acc',
                'bow_gold_acc', 'repeat_gain', 'best_step', 'seconds']:
        assert key in m, key
    # pairs_val: the pairs the metrics are over
    assert m['pairs_train'] == 64 * 6 and m['pairs_val'] == 32 * 6
    evals = {int(l.split()[1][:-1]): float(l.split('dev loss ')[1].split(',')[0])
             for l in log.splitlines() if l.startswith('eval ')}
    assert len(evals) == 2 and m['best_step'] == min(evals, key=evals.get)  # early stopping kept the lowest
    assert 'iter 0/' in log
    for row, acc in [('Bayes limit', m['bayes_acc']), ('bag of words', m['bow_val_acc']), ('reward model',
                                                                                           m['val_acc'])]:
        # the three side by side, as reward.json says
        assert f'{row:22}{acc:8.4f}' in log
    ck = torch.load(os.path.join(runs.dirs['out'], 'reward.pt'), weights_only=True)
    assert {'model', 'model_args', 'config', 'vocab', 'norm_bias', 'rm_context', 'prompt_len',
            'policy'} <= set(ck)


def test_ppo_stage_writes_log_and_eval(runs):
    code, log = runs['ppo']
    assert code == 0, log
    out = runs.dirs['out']
    m = json.load(open(os.path.join(out, 'ppo.json')))
    assert m['iters'] == 3 and m['seconds'] > 0 and m['policy'] == m['reference'] == 'sft.pt'
    for name in ['reference', 'best_of_16', 'ppo']:
        assert set(m['eval'][name]) == {'gold', 'gold_se', 'rm', 'rm_se', 'prob', 'kl', 'length', 'ended',
                                        'repeats', 'logp_ref', 'samples'}
        assert len(m['eval'][name]['samples']) == 3
    assert set(m['calibration']) == {'sft.pt', 'ppo'}
    assert all(0 <= c['ece'] <= 1 for c in m['calibration'].values())
    assert m['eval']['reference']['kl'] == 0 and m['eval']['ppo']['kl'] >= 0
    assert abs(m['eval']['best_of_16']['kl'] - (math.log(16) - 15 / 16)) < 1e-9
    assert [r['n'] for r in m['eval']['best_of_n']] == [1, 2, 4, 8, 16]
    assert [r['step'] for r in m['path']] == [0, 2, 3] and all(r['n'] is None for r in m['path'])
    assert all(r['step'] is None for r in m['eval']['best_of_n'])
    assert m['path'][-1]['gold'] == m['eval']['ppo']['gold']
    frontier = open(os.path.join(out, 'frontier.csv')).read().splitlines()
    assert frontier[0] == 'method,n,step,gold,gold_se,rm,rm_se,prob,kl,length,ended,repeats,logp_ref,beta'
    assert len(frontier) == 1 + 5 + 1 + 3  # best-of-n, the SFT point, PPO's path
    rows = open(os.path.join(out, 'ppo_log.csv')).read().splitlines()
    assert len(rows) == 4 and rows[0].startswith('iter,reward,gold,kl,kl_k1,kl_k3,beta')
    for word in ['reward', 'gold', 'kl', 'beta', 'clipfrac', 'approx_kl', 'pg_loss', 'v_loss', 'entropy']:
        assert f' {word} ' in log.split('iter 2/3 (66%):')[1].split('\n')[0]
    assert "best-of-n at PPO's KL" in log


def test_every_road_on_one_frontier(runs, run_here):
    """PPO, the RLOO group baseline, DPO and expert iteration from one reference, side by side: each its
    own files, and one frontier.csv with a method column, drawn by python frontier.py."""
    for name in ['ppo_again', 'roads_rloo', 'roads_dpo', 'roads_ei']:
        assert runs[name][0] == 0 and 'Traceback' not in runs[name][1], runs[name][1]
    d = runs.dirs['ppo_again']
    code, out = run_here('frontier.py', f'--out_dir={d}')
    assert code == 0 and 'written: ' in out and 'Traceback' not in out, out
    for damaged in ('grpo.json', 'dpo_beta9.json', 'dpo_beta7.json'):  # reported and skipped
        assert f'{damaged} is damaged' in out and f'{damaged} is damaged' in runs['roads_rloo'][1], damaged
    ppo, rloo, dpo = (json.load(open(os.path.join(d, f'{n}.json'))) for n in ('ppo', 'rloo', 'dpo'))
    assert ppo['advantage'] == 'gae' and rloo['advantage'] == 'rloo' and dpo['beta'] == 0.3
    assert {r['method'] for r in ppo['path']} == {'ppo'} and {r['method'] for r in rloo['path']} == {'rloo'}
    assert 'groups of' not in runs['roads_rloo'][1] and ', 4 prompts x 4 (rloo)' in runs['roads_rloo'][1]
    assert rloo['eval']['best_of_n'] == ppo['eval']['best_of_n']  # the same seed: the same curve
    # the kept curve was damaged before RLOO ran (conftest.with_damaged_results): measured again, the same
    assert 'of another shape: measured again' in runs['roads_rloo'][1]
    assert 'measured before' not in runs['ppo_again'][1]
    assert dpo['path'][0]['kl'] == 0 and all(r['beta'] == 0.3 for r in dpo['path']) and dpo == json.load(
        open(os.path.join(d, 'dpo_beta0.3.json')))
    assert 'chosen h' in runs['roads_dpo'][1] and 'rejected h' in runs['roads_dpo'][1]
    rows = list(csv.DictReader(open(os.path.join(d, 'frontier.csv'))))
    methods = [r['method'] for r in rows]
    assert set(methods) == {'best_of_n', 'sft', 'ppo', 'rloo', 'dpo',
                            'expert_iteration'} and methods.count('dpo') == len(dpo['path'])
    assert methods.count('rloo') == len(rloo['path']) == 2 and methods.count('expert_iteration') == 3
    assert len(rows) == 5 + 1 + 3 + 2 + len(dpo['path']) + 3


def test_sample_eval_mode_reproduces_ppo_json(runs):
    code, log = runs['eval']
    assert code == 0, log
    m = json.load(open(os.path.join(runs.dirs['out'], 'eval.json')))
    ppo_eval = json.load(open(os.path.join(runs.dirs['out'], 'ppo.json')))['eval']
    assert set(m) == {'reference', 'best_of_16', 'ppo', 'best_of_n', 'best_of_n_at_ppo_kl', 'prompts'}
    for name in ['reference', 'best_of_16', 'ppo']:  # the same seeds: the same numbers
        assert {k: m[name][k] for k in ('gold', 'rm', 'kl')} == {k: ppo_eval[name][k] for k in ('gold',
                                                                                                'rm', 'kl')}
    assert m['best_of_n'] == ppo_eval['best_of_n']


def test_sample_prints_p_as_sigmoid_of_the_normalised_reward(runs):
    code, log = runs['sample']
    assert code == 0, log
    lines = [l for l in log.splitlines() if l.startswith('--- rm')]
    assert len(lines) == 4
    for l in lines:
        r, p = float(l.split('rm ')[1].split(',')[0]), float(l.split('= ')[1].split()[0])
        assert abs(p - 1 / (1 + math.exp(-r))) < 2e-3


def test_sample_mode_writes_past_the_context_and_says_the_reward_is_uncalibrated(runs):
    code, log = runs['sample_long']
    assert code == 0 and 'Traceback' not in log, log
    assert 'not calibrated' in log and log.count('--- rm') == 2
    texts = log.split('not calibrated\n')[1].split('--- rm')[:2]
    assert all(len(t.strip('\n')) >= 150 for t in texts)  # the prompt '\n' + 150 characters


def chat_answers(log):
    """The bard's answers in a chat transcript: [(text, its bracket of P, reward, time and notes)]."""
    return [(a.split('\n   [P = ')[0], a.split('\n   [P = ')[1].split(']')[0])
            for a in log.split('\nJULIET: ')[1:]]


def test_chat_mode_answers_whole_turns(runs):
    """20 varied lines piped in: one answer each, every one a turn that ended (at a blank line or
    another speaker's name) or, cut at max_answer_len, shown to a whole line, sentence or word;
    none holding a speaker's line."""
    code, log = runs['chat']
    assert code == 0 and 'Traceback' not in log, log
    answers = chat_answers(log)
    assert len(answers) == len(CHAT_LINES) == log.count('[P = ')  # the empty last line ends it
    assert "knows no '7é'" in log and "knows no '\ufffd'" in log  # a Latin-1 byte: a character dropped
    for text, notes in answers:
        assert not TAG.search('\n' + text + '\n') and '\n\n' not in text, text
        if 'cut at 32 characters' in notes:  # never shown cut mid-word
            assert 'shown to its last whole' in notes or ' ' not in text.strip(), (text, notes)


def test_resume_continues_from_the_checkpoint(runs):
    code, log = runs['resume']
    assert code == 0, log
    assert 'resuming from' in log and 'at iter 80' in log
    first = log.split('step 80: ')[1].split('\n')[0]
    assert first == runs['gpt'][1].split('step 80: ')[1].split(', eta')[0]  # same model, same eval batches
    assert 'iter 50/' not in log and 'iter 120/120 (100%): ' in log and 'eta 0m00s' in log
    assert json.load(open(os.path.join(runs.dirs['resume'], 'gpt.json')))['iters'] == 120
    # the data order goes on: a checkpoint of iteration n holds the batch stream after n batches,
    # so iteration n gets the batch an uninterrupted run would have drawn (also after a resume)
    n_train = int(0.9 * len(open(os.path.join(HERE, 'input.txt')).read()))
    opt = dict(a[2:].split('=') for a in TINY_GPT)
    for out in (runs.dirs['out'], runs.dirs['resume']):
        ck = torch.load(os.path.join(out, 'gpt.pt'), weights_only=True)
        gen = torch.Generator().manual_seed(1337)
        for _ in range(ck['iter_num']):
            torch.randint(n_train - int(opt['block_size']) - 1, (int(opt['batch_size']),), generator=gen)
        assert len(ck['rng_states']) == 1, out
        assert torch.equal(ck['rng_states'][0], gen.get_state()), (out, ck['iter_num'])
    assert torch.load(os.path.join(runs.dirs['resume'], 'gpt.pt'), weights_only=True)['iter_num'] > 80


def test_patience_stops_pretraining_without_a_better_val_loss(runs):
    """--patience=1: the first evaluation without a better val loss ends the run, said in the log; the
    best checkpoint is kept and measured as at the end of a full run."""
    code, log = runs['gpt_patience']
    m = json.load(open(os.path.join(runs.dirs['gpt_patience'], 'gpt.json')))
    vals = [float(l.split('val loss ')[1].split(',')[0]) for l in log.splitlines() if l.startswith('step ')]
    assert code == 0 and 'stopped: no better val loss in 1 evaluations' in log and m['iters'] < 400, log
    assert vals[-1] >= min(vals[:-1])
    assert all(a >= b for a, b in zip(vals[:-2], vals[1:-1])), vals  # (printed to 4 decimals)


def test_torchrun_ranks_draw_their_own_dropout(runs):
    """Two gloo processes started as gpt.py starts them: each rank draws its own dropout mask (seed +
    rank, as nanoGPT), not one mask for both."""
    code, log = runs['ddp_masks']
    masks = dict(re.findall(r'rank (\d) of 2: mask (\w+)', log))
    assert code == 0 and set(masks) == {'0', '1'} and masks['0'] != masks['1'], log


def test_torchrun_two_processes_train_what_one_does(runs):
    """torchrun with 2 CPU processes (gloo), one micro-batch each: the losses, the weights and the
    data streams of one process taking both micro-batches of every step; rank 0 alone logs and
    writes one checkpoint."""
    (code1, one), (code2, two) = runs['gpt_accum2'], runs['gpt_ddp']
    assert code1 == 0 and code2 == 0, (one, two)
    assert '2 processes x 1 micro-batch(es) of 4' in two and two.count('step 0: ') == 1, two
    numbers = lambda log: [float(w.rstrip(',')) for l in log.splitlines() if l.startswith(('step ', 'iter '))
                           for w in l.split(', time')[0].split(', eta')[0].split()[3:] if w[0].isdigit()]
    assert len(numbers(one)) == len(numbers(two)) >= 10
    assert numbers(one) == pytest.approx(numbers(two), abs=2e-4)
    a, b = (torch.load(os.path.join(runs.dirs[k], 'gpt.pt'), weights_only=True) for k in ('gpt_accum2',
                                                                                          'gpt_ddp'))
    assert a['iter_num'] == b['iter_num'] and len(a['rng_states']) == len(b['rng_states']) == 2
    assert all(torch.equal(x, y) for x, y in zip(a['rng_states'], b['rng_states']))
    for k in a['model']:
        assert torch.allclose(a['model'][k], b['model'][k], atol=1e-5), k
    assert sorted(os.listdir(runs.dirs['gpt_ddp'])) == ['.gpt.lock', 'gpt.json', 'gpt.pt']  # rank 0's lock
    assert json.load(open(os.path.join(runs.dirs['gpt_ddp'], 'gpt.json')))['processes'] == 2


def strip_times(log, n=20):
    """The first n logged iterations, without their timings."""
    return [l.split(', time')[0].split(', eta')[0] for l in log.splitlines() if l.startswith('iter ')][:n]


def test_same_seed_same_losses(runs):
    """Every stage run a second time with the same seed and settings: the same first 20 iterations."""
    for stage in ['gpt', 'reward', 'ppo']:
        (code, first), (code2, second) = runs[stage], runs[f'{stage}_again']
        assert code == 0 and code2 == 0, second
        assert strip_times(first) == strip_times(second) and len(strip_times(second)) >= 3


# ======== every script: its options, --help, and a user's mistakes (one clear line)
def assert_one_clear_line(code, log, *words):
    assert code != 0, log
    assert 'Traceback' not in log, log
    errors = [l for l in log.splitlines() if l.startswith('error: ')]
    assert len(errors) == 1, log
    for w in words:
        assert w in errors[0], (w, errors[0])


def test_nan_stops_without_overwriting(runs):
    """A run of ppo.py: one line, no traceback, and the checkpoints it started from are untouched."""
    assert_one_clear_line(*runs['ppo_nan'], 'is nan', 'ppo.pt was not overwritten')
    for f in ['sft.pt', 'ppo.pt', 'ppo_log.csv']:  # the last run's log too
        assert open(os.path.join(runs.dirs['ppo_nan'], f), 'rb').read() == \
            open(os.path.join(runs.dirs['out'], f), 'rb').read()


def test_ctrl_c_keeps_the_previous_checkpoint(runs):
    code, out = runs['ctrl_c']
    assert code != 0 and 'Traceback' not in out and 'interrupted' in out, out
    d = runs.dirs['ctrl_c']
    assert open(os.path.join(d, 'gpt.pt'), 'rb').read() == \
        open(os.path.join(runs.dirs['out'], 'gpt.pt'), 'rb').read()  # the scratch run had not beaten it
    assert [f for f in os.listdir(d) if 'tmp' in f] == []


def test_stages_run_out_of_order(run_here, tmp_path):
    os.mkdir(tmp_path / 'gpt_only')
    save_tiny(tiny_model(), tmp_path / 'gpt_only' / 'gpt.pt')
    assert_one_clear_line(*run_here('sft.py', f'--out_dir={tmp_path}'), 'gpt.pt', 'run python gpt.py first')
    assert_one_clear_line(*run_here('reward.py', f'--out_dir={tmp_path}/gpt_only'), 'sft.pt',
                          'run python sft.py first')
    assert_one_clear_line(*run_here('sample.py', f'--out_dir={tmp_path}'), 'run python gpt.py first')
    assert_one_clear_line(*run_here('ppo.py', f'--out_dir={tmp_path}/gpt_only'), 'sft.pt',
                          'run python sft.py first')  # the first step of the chain not yet run
    save_tiny(tiny_model(), tmp_path / 'gpt_only' / 'sft.pt')
    assert_one_clear_line(*run_here('ppo.py', f'--out_dir={tmp_path}/gpt_only'), 'reward.pt',
                          'run python reward.py first')


def test_bad_overrides(run_here, tmp_path):
    # a probe that got past its check finds no checkpoint
    safe = f'--out_dir={tmp_path}/none'
    assert_one_clear_line(*run_here('gpt.py', safe, '--unknown_key=1'), 'unknown option --unknown_key',
                          'did you mean --')
    assert_one_clear_line(*run_here('gpt.py', safe, '--batch_size=abc'), '--batch_size expects int', "'abc'")
    assert_one_clear_line(*run_here('ppo.py', safe, 'max_iters=3'), 'overrides look like --key=value')
    assert_one_clear_line(*run_here('gpt.py', safe, '--lr_decay=step'), "--lr_decay='step' is out of range",
                          "{'cosine', 'linear'}")
    assert_one_clear_line(*run_here('gpt.py', safe, '--token_mix=0'), '--token_mix=0 is out of range',
                          '[1, inf)')
    assert_one_clear_line(*run_here('sample.py', safe, '--top_k=None', '--dropout=0.5'),
                          'unknown option --dropout')
    # relations between options, checked after each option's own range
    assert_one_clear_line(*run_here('gpt.py', safe, '--n_embd=100', '--n_head=3'), '--n_embd=100',
                          '--n_head=3')
    assert_one_clear_line(*run_here('gpt.py', safe, '--n_embd=12', '--n_head=4'), 'even size')
    assert_one_clear_line(*run_here('ppo.py', safe, '--batch_size=1'),
                          '--batch_size=1 must be at least --num_minibatches=2')
    assert_one_clear_line(*run_here('reward.py', safe, '--train_prompts=1', '--prompts_per_batch=2'),
                          '--prompts_per_batch=2 is more than')
    assert_one_clear_line(*run_here('gpt.py', safe, '--max_iters=0'),
                          '--max_iters=0 from scratch trains nothing')
    assert_one_clear_line(*run_here('ppo.py', safe, '--best_of_max=8'), '--best_of_max=8 is out of range',
                          '[16, inf)')
    assert_one_clear_line(*run_here('ppo.py', safe, '--lam=0.9'), 'did you mean --gae_lambda')  # a part of it
    for taken in ('dpo_beta0.3', 'sft', 'best_of_16', 'a/b'):  # a run name that is another's file, or no file
        assert_one_clear_line(*run_here('ppo.py', safe, f'--run_name={taken}'), 'choose another')
    assert_one_clear_line(*run_here('gpt.py', safe, '--device=0'), '--device expects str')
    assert_one_clear_line(*run_here('sample.py', safe, '--mode=eval', '--best_of=4'),
                          '--best_of=4 is for sample and chat')


def test_unwritable_out_dir(run_here, tmp_path):
    (tmp_path / 'afile').write_text('x')
    assert_one_clear_line(*run_here('gpt.py', f'--out_dir={tmp_path}/afile/out'), 'cannot write to out_dir')


class Evil:
    """Unpickling this calls os.system(cmd): what a malicious checkpoint would do."""
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_truncated_checkpoint_and_malicious_pickle(run_here, tmp_path):
    good = tmp_path / 'good.pt'
    save_tiny(tiny_model(), good)
    os.mkdir(tmp_path / 'truncated')
    blob = good.read_bytes()[:good.stat().st_size // 2]
    (tmp_path / 'truncated' / 'gpt.pt').write_bytes(blob)
    assert_one_clear_line(*run_here('sft.py', f'--out_dir={tmp_path}/truncated'),
                          f'cannot load {tmp_path}/truncated/gpt.pt', 'python gpt.py')
    assert (tmp_path / 'truncated' / 'gpt.pt').read_bytes() == blob  # the file is left as it was
    os.mkdir(tmp_path / 'evil')
    # runs a command
    torch.save({'model': Evil(f"touch {tmp_path / 'pwned'}")}, str(tmp_path / 'evil' / 'gpt.pt'))
    assert_one_clear_line(*run_here('sft.py', f'--out_dir={tmp_path}/evil'), 'cannot load')
    assert not (tmp_path / 'pwned').exists(), 'a checkpoint ran code'


def test_checkpoints_of_another_shape(runs, run_here, tmp_path):
    assert runs['reward'][0] == 0
    # this reward.pt + an sft.pt of another shape
    other = copy_ckpts(runs.dirs['out'], tmp_path, 'reward.pt')
    ck = torch.load(os.path.join(runs.dirs['out'], 'gpt.pt'), weights_only=True)
    args = dict(ck['model_args'], n_embd=32)
    save_checkpoint({'model': GPT(GPTConfig(**args)).state_dict(), 'model_args': args, 'vocab': ck['vocab']},
                    os.path.join(other, 'sft.pt'))
    assert_one_clear_line(*run_here('ppo.py', f'--out_dir={other}'), 'reward.pt was made from another',
                          'sft.pt than the one there now', 'python reward.py', '--allow_stale=True')
    assert_one_clear_line(*run_here('ppo.py', f'--out_dir={other}', '--allow_stale=True'),
                          'reward.pt was not trained from', 'python reward.py')


def test_files_of_another_kind_are_one_line(runs, run_here, tmp_path):
    """A file where another kind is expected: preferences.pt that is a GPT, or of another shape; resuming
    from a later step's model or with another shape; a gpt.pt without model_args or with settings no
    model can be built from. One line each, nothing written."""
    assert runs['ppo'][0] == 0
    d = copy_ckpts(runs.dirs['out'], tmp_path / 'prefs', 'sft.pt', 'reward.pt')
    shutil.copy(os.path.join(runs.dirs['out'], 'gpt.pt'), os.path.join(d, 'preferences.pt'))
    assert_one_clear_line(*run_here('dpo.py', f'--out_dir={d}'),
                          'preferences.pt holds a GPT, not preference data')
    torch.save({'train': {'seqs': torch.zeros(2, 3)}, 'dev': {}, 'val': {}, 'vocab': VOCAB,
                'policy': 'sft.pt',
                'prompt_len': 16, 'max_answer_len': 32, 'tau': 1.0}, os.path.join(d, 'preferences.pt'))
    assert_one_clear_line(*run_here('dpo.py', f'--out_dir={d}'), 'is not preference data as reward.py writes')
    d = copy_ckpts(runs.dirs['out'], tmp_path / 'resume', 'gpt.pt')
    resume = ['--init_from=resume', '--max_iters=100', f'--out_dir={d}']
    assert_one_clear_line(*run_here('gpt.py', *resume, '--n_layer=3'), 'keeps its shape', '--n_layer')
    shutil.copy(os.path.join(runs.dirs['out'], 'sft.pt'), os.path.join(d, 'gpt.pt'))
    assert_one_clear_line(*run_here('gpt.py', *resume), 'was not written by gpt.py', 'no optimizer state')
    for broken in ({'model': {}, 'vocab': VOCAB}, {'model': {}, 'vocab': VOCAB, 'model_args': 'six layers'},
                   {'model': {}, 'vocab': VOCAB, 'model_args': {'n_embd': 7, 'n_head': 0}}):
        torch.save(broken, os.path.join(d, 'gpt.pt'))
        code, log = run_here('sft.py', f'--out_dir={d}')
        assert_one_clear_line(code, log, 'gpt.pt')
    assert [f for f in os.listdir(d) if not f.startswith('.')] == ['gpt.pt']  # (.<stage>.lock: locks)


def test_a_quick_try_never_replaces_a_trained_checkpoint(runs, run_here, tmp_path):
    """python gpt.py --max_iters=2 beside a gpt.pt trained longer: refused before any work, gpt.pt as it
    was; the same budget or more replaces it as before (the pipeline's own runs)."""
    assert runs['gpt'][0] == 0
    d = copy_ckpts(runs.dirs['out'], tmp_path, 'gpt.pt')
    before = open(os.path.join(d, 'gpt.pt'), 'rb').read()
    assert_one_clear_line(*run_here('gpt.py', *TINY_GPT, '--max_iters=2', f'--out_dir={d}'),
                          'gpt.pt was trained on', 'its own --out_dir', 'delete')
    assert open(os.path.join(d, 'gpt.pt'), 'rb').read() == before


def test_a_chain_that_changed_under_a_step_is_refused_unless_told(runs, run_here, tmp_path):
    """gpt.pt written again after sft.pt was made from it (a quick try in the same folder): a later step
    that reads sft.pt refuses in one line, naming what to run, unless --allow_stale=True."""
    assert runs['reward'][0] == 0
    d = copy_ckpts(runs.dirs['out'], tmp_path, 'gpt.pt', 'sft.pt', 'reward.pt', 'preferences.pt')
    save_tiny(tiny_model(7), os.path.join(d, 'gpt.pt'))  # another gpt.pt
    for script in ('reward.py', 'ppo.py', 'dpo.py', 'sample.py'):
        assert_one_clear_line(*run_here(script, f'--out_dir={d}', '--seed=1'),
                              'sft.pt was made from another', 'gpt.pt', 'python sft.py', '--allow_stale=True')
    code, log = run_here('sample.py', f'--out_dir={d}', '--ckpt=sft', '--allow_stale=True', '--num_samples=1')
    assert code == 0 and '--- rm' in log, log


def test_eval_mode_on_a_dpo_run_says_where_its_points_are(runs, run_here):
    assert runs['roads_dpo'][0] == 0
    d = runs.dirs['ppo_again']
    assert_one_clear_line(*run_here('sample.py', f'--out_dir={d}', '--mode=eval', '--ckpt=dpo'),
                          'is a run of dpo.py', 'dpo.json', 'python frontier.py')


def test_torchrun_on_a_one_process_step_and_its_errors_said_once(runs):
    """torchrun ... sft.py: refused in one line (said by rank 0 alone), nothing trained or written."""
    code, log = runs['sft_torchrun']
    assert code != 0 and log.count('error: ') == 1 and 'sft.py runs in one process' in log, log
    assert sorted(os.listdir(runs.dirs['sft_torchrun'])) == ['gpt.pt']


def test_stages_choose_the_cpu_themselves(tmp_path):
    """Every stage run of this suite passes --device=cpu; in its process CUDA looks present with no GPU
    (conftest.NO_GPU), so a stage that chose its own device would pick 'cuda' and stop, on any machine."""
    code, log = run('gpt.py', f'--out_dir={tmp_path}', '--max_iters=1')
    assert code == 1 and "--device='cuda': this machine has 0 CUDA GPU(s)" in log, log
    code, log = run('gpt.py', f'--out_dir={tmp_path}', '--device=cpu', '--help')
    assert code == 0 and '--n_layer=2' in log, log


def test_out_of_vocabulary_prompt_is_one_clear_line(runs, run_here):
    assert runs['ppo'][0] == 0
    assert_one_clear_line(*run_here('sample.py', f'--out_dir={runs.dirs["out"]}', '--start=Hello wörld 7'),
                          "characters not in the vocabulary: '7ö'")


def in_process_error(capsys, fn, *args):
    """What an imported function does with a user's mistake: raise MinibardError (a ValueError)
    with a one-line message, print nothing and never exit (a notebook's kernel lives on)."""
    with pytest.raises(MinibardError) as e:
        fn(*args)
    assert isinstance(e.value, ValueError) and '\n' not in str(e.value) and capsys.readouterr().err == ''
    return str(e.value)


def test_empty_or_missing_input_and_garbage_checkpoint(tmp_path, capsys):
    (tmp_path / 'empty.txt').write_text('')
    assert 'empty.txt has only 0 characters' in in_process_error(capsys, load_text,
                                                                 str(tmp_path / 'empty.txt'))
    assert 'no ' in in_process_error(capsys, load_text, str(tmp_path / 'nope.txt'))
    (tmp_path / 'odd.txt').write_text(open(os.path.join(HERE, 'input.txt')).read() + ' ~ ')
    assert "characters the checkpoint never saw ('~')" in in_process_error(
        capsys, load_splits, str(tmp_path / 'odd.txt'), VOCAB)
    (tmp_path / 'latin1.txt').write_bytes('Tybalt, thou art a villain — très bien'.encode('latin-1',
                                                                                          'replace') * 50)
    assert 'latin1.txt is not UTF-8 text' in in_process_error(capsys, load_text, str(tmp_path / 'latin1.txt'))
    assert 'is a folder' in in_process_error(capsys, load_text, str(tmp_path))
    (tmp_path / 'g.pt').write_bytes(b'not a checkpoint at all')
    assert 'cannot load' in in_process_error(capsys, load_checkpoint, str(tmp_path / 'g.pt'))
    assert 'no ' in in_process_error(capsys, load_checkpoint, str(tmp_path / 'none.pt'))
    assert "not in the vocabulary: 'é'" in in_process_error(capsys, encode, 'héllo', VOCAB)
    save_tiny(tiny_model(), tmp_path / 'gpt.pt')
    assert 'holds a GPT, not a reward model' in in_process_error(capsys, load_reward_model,
                                                                 str(tmp_path / 'gpt.pt'))
    torch.save({'train': {}, 'policy': 'sft.pt'}, tmp_path / 'prefs.pt')
    assert 'holds preference data, not a GPT' in in_process_error(capsys, load_gpt,
                                                                  str(tmp_path / 'prefs.pt'))


def script_globals(script, device=None):
    """A script's globals as an import leaves them, the defaults that depend on the device
    (ByDevice) resolved for `device` (None: the script's own default device)."""
    g = runpy.run_path(os.path.join(HERE, script), run_name='imported')
    resolve_defaults(g, device or g.get('device', 'cpu'))
    return g


def test_size_defaults_follow_the_device(capsys):
    """The sizes follow the run's --device, not whether CUDA is present: --device=cpu on a GPU
    machine gets the CPU sizes, --device=cuda the GPU ones (resolved here without a GPU)."""
    cpu, cuda, mps = (script_globals('gpt.py', d) for d in ('cpu', 'cuda:1', 'mps'))
    assert (cpu['n_layer'], cpu['n_embd'], cpu['batch_size']) == (2, 128, 3)
    assert (cuda['n_layer'], cuda['n_embd'], cuda['batch_size']) == (6, 384, 64)
    assert mps['n_layer'] == 2
    for script in ('gpt.py', 'sft.py', 'reward.py', 'ppo.py', 'dpo.py', 'expert_iteration.py', 'sample.py'):
        g = runpy.run_path(os.path.join(HERE, script), run_name='imported')
        sized = {k: v for k, v in g.items() if isinstance(v, ByDevice)}
        assert sized or script in ('sft.py', 'sample.py'), script
        config = configure(g, ['--device=cpu'])  # as each script starts
        assert all(config[k] == v.cpu for k, v in sized.items()), script
        assert not any(isinstance(v, ByDevice) for v in config.values()), script
    g = runpy.run_path(os.path.join(HERE, 'ppo.py'), run_name='imported')
    assert configure(g, ['--device=cpu', '--batch_size=64'])['forward_batch_size'] == 32
    assert configure(dict(g, __file__=g['__file__']), ['--forward_batch_size=7'])['forward_batch_size'] == 7


@pytest.mark.parametrize('script', ['gpt.py', 'sft.py', 'reward.py', 'ppo.py', 'dpo.py',
                                    'expert_iteration.py', 'sample.py', 'bench.py'])
def test_help_lists_every_option_with_its_default(script, run_here, tmp_path):
    """--help: exit 0, every global of the hyperparameter block as --name=value with its comment,
    and nothing loaded or written."""
    g = script_globals(script)
    src = open(os.path.join(HERE, script)).read()
    first = src[:src.index('\n# hyperparameters')].count('\n') + 2  # the block's lines, 1-based
    last = first + src[src.index('\n# hyperparameters') + 1:].split('\n# ----')[0].count('\n')
    keys = [t.id for node in ast.parse(src).body if isinstance(node, ast.Assign)
            and first <= node.lineno <= last
            for target in node.targets for t in ast.walk(target) if isinstance(t,
                                                                               ast.Name) and t.id[0] != '_']
    assert len(keys) >= 5
    code, out = run_here(script, f'--out_dir={tmp_path}/new', '--help')
    assert code == 0 and 'Traceback' not in out and not (tmp_path / 'new').exists()
    assert out.splitlines()[0] == g['__doc__'].strip().splitlines()[0] and f'python {script}' in out
    for k in keys:
        assert f'--{k}={g[k]!r}' in out, k
    assert '--seed=' in out and ('# ' not in out.split('options')[1].split('usage')[0])  # comments, not code


def block_options(script):
    """(name, default, comment) of each option in a script's hyperparameter block, found by
    parsing the source (not by the code under test): the block is the lines from
    '# hyperparameters' to the next '# ----'."""
    src = open(os.path.join(HERE, script)).read()
    g = script_globals(script)
    lines = src.splitlines()
    first = next(i for i, l in enumerate(lines) if l.startswith('# hyperparameters')) + 1
    last = next(i for i in range(first, len(lines)) if lines[i].startswith('# ----'))
    out = []
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and first < node.lineno <= last:
            comment = lines[node.lineno - 1].partition('#')[2].strip()
            out += [(t.id, g[t.id], comment) for target in node.targets for t in ast.walk(target)
                    if isinstance(t, ast.Name) and not t.id.startswith('_')]
    return g, out


def wrong_values(default, comment):
    """A wrong-typed value and an out-of-range one (None where the type has no range) for an
    option: the rule at the start of its comment says what is allowed."""
    wrong_type = '5' if isinstance(default, str) else "'abc'"
    m = re.match(r"^(?:int |float )?in ([\[(])\s*([^,]+),\s*([^\])]+)([\])])", comment)
    if m:
        lo, hi = float(m.group(2)), float(m.group(3))
        bad = lo if m.group(1) == '(' else lo - 1 if lo > -math.inf else hi + 1
        return wrong_type, repr(int(bad) if float(bad).is_integer() and not isinstance(default,
                                                                                       float) else bad)
    if comment.startswith('in {'):
        return wrong_type, "'nonsense'"
    if isinstance(default, str):
        return wrong_type, "''"
    return wrong_type, None


@pytest.mark.parametrize('script', ['gpt.py', 'sft.py', 'reward.py', 'ppo.py', 'dpo.py',
                                    'expert_iteration.py', 'sample.py', 'bench.py'])
def test_every_option_is_checked_before_any_work(script, run_here, tmp_path):
    """Each option with a wrong-typed and an out-of-range value: one `error:` line naming it,
    no traceback, nothing written. Every number has a declared range (`in [lo, hi)` first in its
    comment), so a new option cannot be added without its check."""
    g, options = block_options(script)
    assert len(options) >= 5
    for name, default, comment in options:
        assert isinstance(default, (bool, str)) or comment.startswith(('in ', 'int in ', 'float in ')), \
            f'{script}: --{name} has no range in its comment'
        for value in wrong_values(default, comment):
            if value is None:
                continue
            out_dir = [f'--out_dir={tmp_path}/new'] if 'out_dir' in g and name != 'out_dir' else []
            code, out = run_here(script, *out_dir, f'--{name}={value}')
            lines = out.strip().splitlines()
            assert code != 0 and len(lines) == 1, (name, value, out)
            assert lines[0].startswith('error: ') and f'--{name}' in lines[0], \
                (name, value, out)
            assert not (tmp_path / 'new').exists()
