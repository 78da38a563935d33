r"""
sample.py: talk to the bard. Step 4 of minibard: ask, read, compare.

Every answer comes with its reward-model score r and P = sigmoid(r). The RM scores answers of the
policy it learnt from (SFT; the pretrained model on the road without it) 0 on average, so by
Bradley-Terry P = P(the labeler prefers this answer to a typical one of that policy). P is calibrated
on whole turns of up to max_answer_len characters (ece in out/reward.json): a chat answer cut there
is shown to its last whole line or sentence and scored as shown; longer samples are scored over the
last window the RM reads, with a note.

Run:
    python sample.py                # 3 continuations of --start, each with P
    python sample.py --start='ROMEO:\nO gentle' --best_of=16   # keep the RM's favourite of 16
    python sample.py --start=FILE:prompt.txt --ckpt=gpt --max_new_tokens=500   # any length
    python sample.py --mode=chat    # you speak as ROMEO, the bard answers as JULIET
    echo 'What light through yonder window breaks?' | python sample.py --mode=chat
    python sample.py --mode=web     # the chat in a browser, at http://127.0.0.1:8000/
    python sample.py --mode=eval    # ppo.py's gold-vs-KL frontier again -> out/eval.json
"""
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from configurator import configure
from data import (END_OF_TURN, answer_texts, as_turns, clean, encode, end_of_turn, format_chat, load_splits,
                  sample_answers, trim_to_whole)
from frontier import (best_of_n, best_of_n_frontier, eval_result, held_out_prompts, policy_point,
                      print_frontier)
from model import load_gpt, load_policy_and_rm, rm_scores
from plumbing import MinibardError, die, prepare_out_dir, progress, write_json

# ----------------------------------------------------------------------------------------
# hyperparameters (`--key=value` overrides any of them)
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', ...; sizes follow it
out_dir = 'out'
data_path = 'input.txt'         # eval mode: held-out prompts come from its validation part
ckpt = 'ppo'                    # 'ppo', 'sft', 'gpt', ... or a path; ppo falls back to sft, then gpt
mode = 'sample'                 # in {'sample', 'chat', 'web', 'eval'}: web: the chat as a local page
start = '\n'                    # sample mode's prompt, or 'FILE:path' to read it from a file
num_samples = 3                 # in [1, 1000]: continuations printed in sample mode
max_new_tokens = None           # int in [1, inf) or None: sample mode's length; None = the RM's
temperature = 1.0               # in [0, inf): the PPO policy was trained at 1.0
top_k = None                    # int in [1, inf) or None: only the k likeliest characters (None: all)
best_of = 1                     # in [1, 4096]: draw n answers, keep the RM's favourite (1 = plain sampling)
seed = 1337                     # in [0, inf)
you = 'ROMEO'                   # chat: the character you speak as
bard = 'JULIET'                 # chat: the character the model answers as, a whole turn each time
host = '127.0.0.1'              # web: the address to listen on (127.0.0.1: this machine only)
port = 8000                     # in [0, 65535]: web: the port (0: any free one)
allow_stale = False             # go on with checkpoints made from older ones than those there now
# ----------------------------------------------------------------------------------------


def checkpoint_path(name, out_dir):
    """'ppo', 'sft', 'rloo', ... -> out_dir/<name>.pt, a path as it is; a missing ppo.pt falls back to
    sft.pt, then gpt.pt, with a note."""
    if not name.isidentifier():
        return name
    path = os.path.join(out_dir, f'{name}.pt')
    for fallback in {'ppo': ['sft', 'gpt'], 'sft': ['gpt']}.get(name, []):
        if os.path.exists(path):
            break
        path = os.path.join(out_dir, f'{fallback}.pt')
        print(f'note: no {out_dir}/{name}.pt yet (run python {name}.py); trying {path}', file=sys.stderr)
    return path


def continuations(model, rm, vocab, prompt, n_answers, max_len, stop, gen, best_of=1, temperature=1.0,
                  top_k=None):
    """n_answers continuations of `prompt`, each the RM's favourite of best_of, ended by the tokens
    `stop` (None: at max_len): [(text, RM score r, P)]."""
    dev = next(model.parameters()).device
    ids = torch.tensor([encode(prompt, vocab)], device=dev).repeat(n_answers, 1)  # (n, T)
    total = n_answers * best_of
    advance = progress('answers', total, 1024, lambda s: print(s, file=sys.stderr)) if total > 1024 else None
    y, lengths, r, *_ = best_of_n(model, rm, ids, best_of, max_len, stop, temperature, gen, top_k=top_k,
                                  on_progress=advance)
    texts = answer_texts(y, lengths, vocab)
    return [(text, r[i].item(), torch.sigmoid(r[i]).item()) for i, text in enumerate(texts)]


def reply(model, rm, vocab, turns, bard, max_len, stop, gen, best_of=1, temperature=1.0, top_k=None):
    """The bard's next turn after `turns` [(speaker, line)], as both chat modes show it: the RM's
    favourite of best_of answers. -> {'answer', 'p', 'rm', 'seconds', 'cut', 'note'}."""
    t0, dev = time.time(), next(model.parameters()).device
    prompt = format_chat(turns, bard, model.config.block_size - max_len - len(END_OF_TURN))
    ids = torch.tensor([encode(prompt, vocab)], device=dev).repeat(best_of, 1)  # (n, Tp)
    for _ in range(5):  # a turn that says nothing: draw again
        y, lengths = sample_answers(model, ids, max_len, stop, temperature, gen, top_k=top_k)
        drawn = [end_of_turn(text) for text in answer_texts(y, lengths, vocab)]
        shown = [trim_to_whole(text, finished) for text, finished in drawn]
        if any(text.strip() for text, _ in shown):
            break
    said, n = as_turns([text for text, _ in shown], vocab, dev)  # (n, Ta), (n,)
    with torch.no_grad():
        r = rm_scores(rm, torch.cat([ids, said], 1), ids.size(1), n).tolist()  # (n,) on what is shown
    best = max([i for i, (text, _) in enumerate(shown) if text.strip()] or [0], key=lambda i: r[i])
    (text, how), (drawn_text, finished) = shown[best], drawn[best]
    note = '' if finished else f'cut at {max_len} characters' + (
        f', shown to its last whole {how} ({len(text)} of {len(drawn_text)})' if how != 'none' else '')
    return {'answer': text, 'p': torch.sigmoid(torch.tensor(r[best])).item(), 'rm': r[best],
            'seconds': round(time.time() - t0, 3), 'cut': not finished, 'note': note}


# ------------------------------------------------------------------ the chat as a local web page
MAX_BODY, MAX_LINE, MAX_TURNS, MAX_BEST_OF = 65536, 500, 200, 64  # what one request may hold
PAGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'chat.html')  # the page, read once


class BadRequest(Exception):
    """A request that cannot be answered: its HTTP status and one line."""
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def read_chat_request(body, vocab, you, bard):
    """POST /chat's body {"history": [{"who": "you" | "bard", "text": ...}, ...], "line": ..., "best_of": n}
    -> (turns, the line as the bard reads it, best_of, note), or BadRequest."""
    try:
        request = json.loads(body.decode('utf-8'))
    except (UnicodeDecodeError, ValueError, RecursionError):  # (RecursionError: nested too deep)
        raise BadRequest(400, 'the body is not JSON: send {"history": [...], "line": "...", "best_of": 1}')
    if not isinstance(request, dict) or not isinstance(request.get('line'), str):
        raise BadRequest(400, 'the JSON needs a "line": the text you say, as a string')
    history, best_of = request.get('history', []), request.get('best_of', 1)
    if not isinstance(history, list) or len(history) > MAX_TURNS or not all(
            isinstance(t, dict) and t.get('who') in ('you', 'bard') and isinstance(t.get('text'), str)
            and len(t['text']) <= 4 * MAX_LINE for t in history):
        raise BadRequest(400, f'"history" must be a list of at most {MAX_TURNS} turns '
                              '{"who": "you" or "bard", "text": "..."}')
    if type(best_of) is not int or not 1 <= best_of <= MAX_BEST_OF:
        raise BadRequest(400, f'"best_of" must be a whole number from 1 to {MAX_BEST_OF}')
    line = request['line'].strip()
    if not line:
        raise BadRequest(400, 'the line is empty: say something to the bard')
    if len(line) > MAX_LINE:
        raise BadRequest(400, f'the line is {len(line)} characters; the bard listens to at most {MAX_LINE}')
    line, dropped = clean(line, vocab)
    if not line.strip():
        raise BadRequest(400, f'the bard knows none of the characters {dropped!r}: try plain English letters')
    turns = [(you if t['who'] == 'you' else bard, clean(t['text'], vocab)[0]) for t in history]
    note = f'the bard knows no {dropped!r}; left out' if dropped else ''
    return turns + [(you, line)], line, best_of, note


def make_server(host, port, chat, vocab, you, bard, model='the model', typical='the policy', quiet=False,
                wait=10):
    """The chat's server: GET / the page (naming the model and `typical`, the policy P compares with),
    POST /chat an answer, chat(turns, best_of) -> reply()'s dict. The page keeps the scene. Every
    request it reads gets a status and one JSON line."""
    lock = threading.Lock()  # one answer at a time: one model, one generator
    names = json.dumps({'you': you, 'bard': bard, 'model': model, 'typical': typical}).replace('<', '\\u003c')
    with open(PAGE_PATH, encoding='utf-8') as f:
        page = f.read().replace('NAMES_JSON', names)  # all inline: nothing is fetched
    hosts = None if host in ('', '0.0.0.0', '::') else {'127.0.0.1', 'localhost', '::1', host.lower()}

    class Handler(BaseHTTPRequestHandler):
        timeout = wait  # seconds a request may take: a client that stops sending frees its thread

        def send(self, status, body, kind='application/json'):
            data = (body if isinstance(body, str) else json.dumps(body)).encode('utf-8')
            self.send_response(status)
            self.send_header('Content-Type', f'{kind}; charset=utf-8')
            self.send_header('Content-Length', str(len(data)))
            self.send_header('Content-Security-Policy', "default-src 'none'; style-src 'unsafe-inline'; "
                             "script-src 'unsafe-inline'; connect-src 'self'")
            if status == 405:
                self.send_header('Allow', 'GET, POST')
            self.end_headers()
            if self.command != 'HEAD':
                self.wfile.write(data)

        def send_error(self, code, message=None, explain=None):  # http.server's own: a JSON line too
            self.close_connection, self.request_version = True, 'HTTP/1.0'  # a status line, always
            if code == 501:  # a method http.server has no do_ for
                return self.not_allowed()
            self.send(code, {'error': message or 'the request cannot be read'})

        def refused(self):  # a Host that is not this machine's: a page elsewhere, through DNS rebinding
            name = self.headers.get('Host', '')
            name = name[1:name.find(']')] if name.startswith('[') else name.split(':')[0]
            if hosts is not None and name and name.lower() not in hosts:
                self.send(403, {'error': f'Host {name[:60]!r} is not this server: open '
                                         f'http://127.0.0.1:{self.server.server_address[1]}/'})
                return True

        def do_GET(self):
            if self.refused():
                return
            if self.path.split('?')[0] != '/':
                return self.send(404, {'error': f'no page {self.path[:80]!r} here: the chat is at /'})
            self.send(200, page, 'text/html')

        do_HEAD = do_GET

        def do_POST(self):
            if self.refused():
                return
            if self.path != '/chat':
                return self.send(404, {'error': f'nothing to POST to at {self.path[:80]!r}: use /chat'})
            try:
                size = int(self.headers.get('Content-Length', ''))
            except ValueError:
                return self.send(411, {'error': 'send the body with a Content-Length'})
            if not 0 <= size <= MAX_BODY:
                self.close_connection = True  # the body stays unread
                return self.send(413, {'error': f'the request is {size} bytes; at most {MAX_BODY}'})
            try:
                body = self.rfile.read(size)
            except OSError:  # a timeout: the body never came
                self.close_connection = True
                return self.send(408, {'error': f'the body did not come within {self.timeout} s'})
            try:
                turns, line, best_of, note = read_chat_request(body, vocab, you, bard)
            except BadRequest as e:
                return self.send(e.status, {'error': str(e)})
            try:
                with lock:
                    answer = chat(turns, best_of)
            except Exception as e:  # noqa: BLE001 (the server answers, whatever broke)
                return self.send(500, {'error': f'the bard could not answer ({type(e).__name__}: {e})'[:300]})
            answer['note'] = '; '.join(n for n in (note, answer['note']) if n)
            self.send(200, {**answer, 'line': line})

        def not_allowed(self):
            self.send(405, {'error': f'{str(self.command)[:20]} is not answered here: GET / for the page, '
                                     'POST /chat'})

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = not_allowed

        def log_message(self, fmt, *args):  # one short line a request
            if quiet:
                return
            path = getattr(self, 'path', '')[:40]
            what = f'{self.command} {path}' if self.command else 'unreadable request'
            print(f'{what} {args[1] if len(args) > 1 else ""}', file=sys.stderr)

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise MinibardError(f'cannot listen on {host}:{port} ({e.strerror}): choose another with --port=... '
                            'or --host=...') from None
    server.daemon_threads = True
    return server


if __name__ == '__main__':
    configure(globals(), sys.argv[1:])
    torch.manual_seed(seed)
    gen = torch.Generator(device).manual_seed(seed)
    if mode == 'eval' and best_of != 1:
        die(f"--best_of={best_of} is for sample and chat modes: eval mode measures best-of-n for every n "
            f"up to ppo.py's --best_of_max")
    if mode == 'sample' and num_samples * best_of > 65536:
        die(f'--num_samples={num_samples} x --best_of={best_of} is {num_samples * best_of:,} answers: '
            'at most 65,536 at once')
    path = checkpoint_path(ckpt, out_dir)
    model, vocab, checkpoint, rm, rm_checkpoint = load_policy_and_rm(path, os.path.join(out_dir, 'reward.pt'),
                                                                     device, allow_stale)
    max_answer_len = rm_checkpoint['max_answer_len']  # the turns the RM was calibrated on
    labelled = rm_checkpoint.get('policy', 'gpt.pt').removesuffix('.pt')  # its answers score 0 on average
    max_new_tokens = max_new_tokens or max_answer_len

    stop = encode(END_OF_TURN, vocab)  # where a turn ends: chat and web modes
    if mode in ('chat', 'web'):
        encode(you + bard, vocab)  # names any character the model lacks
        chat = lambda turns, n: reply(model, rm, vocab, turns, bard, max_answer_len, stop, gen, n,
                                      temperature, top_k)
    if mode == 'eval':  # ppo.py's evaluation again, with the settings and seeds it used (from ppo.pt)
        run = checkpoint.get('metrics', {}).get('eval', {})
        stage = next((m for m in ('dpo', 'expert_iteration') if m in run), None)
        if stage:
            die(f'eval mode measures a run of ppo.py again; {path} is a run of {stage}.py, whose points '
                f'are in {out_dir}/{stage}.json: python frontier.py draws them with the others')
        if 'best_of_n' not in run:
            die(f'eval mode measures a run of ppo.py again (PPO, or --advantage=rloo or grpo): {path} is '
                'not one; run python ppo.py first')
        prepare_out_dir(out_dir, 'eval')
        t0, c = time.time(), checkpoint['config']
        ref = load_gpt(os.path.join(out_dir, c.get('reference', 'gpt.pt')), device=device)[0]  # PPO's start
        _, val_data, _ = load_splits(data_path, vocab)
        held_out = held_out_prompts(val_data, vocab, c['eval_prompts'], c['prompt_len'], c['seed'], device)
        answers = (held_out, vocab, c['max_answer_len'], c['stop'], c['temperature'])  # as ppo.py drew them
        print(f"best-of-n, n = 1..{c['best_of_max']}, on {c['eval_prompts']} held-out prompts ...")
        curve, samples = best_of_n_frontier(ref, rm, *answers, c['best_of_max'], c['seed'], log=print)
        print(f"{time.time() - t0:.1f}s: the PPO policy, {c['eval_samples']} answers per prompt ...")
        *earlier, last = checkpoint['metrics']['path']
        method = last['method']  # ppo, rloo or grpo
        final, ppo_samples = policy_point(model, ref, rm, *answers, c['eval_samples'], c['seed'],
                                          c['max_iters'], method=method)
        result = eval_result(curve, final, samples, ppo_samples, held_out, vocab)
        write_json(result, os.path.join(out_dir, 'eval.json'))
        print_frontier(curve, earlier + [final], result)
        print(f'{time.time() - t0:.1f} s; best-of-n and the final PPO policy measured again (the earlier PPO '
              f'points are read from {path}); written to {out_dir}/eval.json')

    elif mode == 'sample':
        prompt = start
        if start.startswith('FILE:'):
            try:
                with open(start[5:], encoding='utf-8') as f:
                    prompt = f.read()
            except (OSError, UnicodeDecodeError) as e:
                die(f'cannot read the prompt file {start[5:]}: {e}')
        prompt = prompt.replace('\\n', '\n')  # --start='A:\\nB' means a newline
        if not prompt:
            die(f'the prompt {start!r} is empty: the model needs at least one character to go on from')
        encode(prompt, vocab)  # names any character the model lacks
        window = rm.trunk.config.block_size  # answer characters the RM reads at most
        if max_new_tokens > max_answer_len:
            print(f'note: the RM was calibrated on turns of up to {max_answer_len} characters; P below is '
                  f'over the last {min(max_new_tokens, window)} it reads, not calibrated', file=sys.stderr)
        for text, r, p in continuations(model, rm, vocab, prompt, num_samples, max_new_tokens, None, gen,
                                        best_of, temperature, top_k):
            print(prompt + text)
            print(f'--- rm {r:+.3f}, P(preferred to a typical {labelled} answer) = {p:.3f}' +
                  (f' (best of {best_of})' if best_of > 1 else ''))

    elif mode == 'chat':
        turns = []
        sys.stdin.reconfigure(errors='replace')  # a byte that is no UTF-8: a character the bard drops
        print(f'You are {you}; {bard} answers. An empty line, Ctrl-D or Ctrl-C ends the scene.',
              file=sys.stderr)
        while True:
            try:
                line = input(f'{you}: ')
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                break
            if not sys.stdin.isatty():  # piped: show the line, as a terminal would
                print(line)
            if not line.strip():
                break
            line, dropped = clean(line.strip(), vocab)
            if dropped:
                print(f'note: the bard knows no {dropped!r}; left out', file=sys.stderr)
            if not line:  # nothing the bard can read: ask again
                continue
            turns.append((you, line))
            a = chat(turns, best_of)
            turns.append((bard, a['answer']))
            print(f"{bard}: {a['answer']}\n   [P = {a['p']:.2f}, rm {a['rm']:+.2f}, "
                  f"{a['seconds']:.1f} s" + (f", {a['note']}" if a['note'] else '') + ']')

    else:  # web: the same chat as a local page, which keeps the scene and sends it each time
        typical = {'sft': 'the SFT model', 'gpt': 'the pretrained model'}.get(labelled, labelled)
        server = make_server(host, port, chat, vocab, you, bard, os.path.basename(path), typical)
        if host not in ('127.0.0.1', 'localhost', '::1'):
            print(f'note: listening on {host}: anyone who can reach this machine can talk to the bard',
                  file=sys.stderr)
        print(f'the bard is at http://{host}:{server.server_address[1]}/ (Ctrl-C stops it)')
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print('\nstopped serving', file=sys.stderr)
        finally:
            server.server_close()
