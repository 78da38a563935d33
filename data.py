"""
data.py: the corpus as characters, and turns of the play: prompts, answers, masks, where a turn ends.

 - the corpus: input.txt read and checked, the character codec (65 symbols), the train/val split
   by position (first 90% train);
 - turns: a speech start of the text as a prompt (the end of a speech, the blank line, the
   speaker's name), one turn sampled after each, padded after its end; the masks and chunked
   forwards that keep the padding out of every sum;
 - the chat: the scene in the play's format as a prompt, where a drawn answer's turn ends
   (end_of_turn) and how much of an unfinished one is shown (trim_to_whole).
"""
import os
import re

import torch
import torch.nn.functional as F

from plumbing import MinibardError

END_OF_TURN = '\n\n'  # a speech ends with a blank line before the next speaker, as in input.txt


# ------------------------------------------------------------------ the corpus and its characters
def load_text(path):
    """The corpus as a string; a missing, empty or unusable file is a user error."""
    if not os.path.exists(path):
        raise MinibardError(f'no {path}: copy Tiny Shakespeare there (see README.md)')
    if os.path.isdir(path):
        raise MinibardError(f'{path} is a folder, not a text file')
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise MinibardError(f'{path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}): '
                            'use a plain text file') from None
    if len(text) < 1000:
        raise MinibardError(f'{path} has only {len(text)} characters: it should be Tiny Shakespeare '
                            '(1,115,394)')
    if END_OF_TURN not in text:  # every later step ends a turn there
        raise MinibardError(f'{path} has no blank line: minibard needs text in turns, as Tiny Shakespeare '
                            'has (a blank line ends a speech)')
    return text


def build_vocab(text):
    """The sorted set of characters of the corpus (65 for Tiny Shakespeare)."""
    return ''.join(sorted(set(text)))


def encode(s, vocab):
    """str -> list of ints. A character outside the vocabulary is a user error, named."""
    stoi = {ch: i for i, ch in enumerate(vocab)}
    bad = sorted(set(ch for ch in s if ch not in stoi))
    if bad:
        raise MinibardError(f'characters not in the vocabulary: {"".join(bad)!r}; use only {vocab!r}')
    return [stoi[ch] for ch in s]


def decode(ids, vocab):
    """list (or 1-D tensor) of ints -> str."""
    return ''.join(vocab[i] for i in (ids.tolist() if torch.is_tensor(ids) else ids))


def load_splits(path, vocab=None):
    """(train, val, vocab): the corpus as token tensors, split by position (first 90% train).
    With a checkpoint's vocab, the corpus must use only its characters."""
    text = load_text(path)
    vocab = vocab or build_vocab(text)
    extra = set(text) - set(vocab)
    if extra:
        raise MinibardError(f'{path} has characters the checkpoint never saw ({"".join(sorted(extra))!r}): '
                            'train on this corpus from scratch with python gpt.py')
    data = torch.tensor(encode(text, vocab), dtype=torch.long)
    n = int(0.9 * len(data))
    return data[:n], data[n:], vocab


# ------------------------------------------------------------------ turns: prompts and answers
def turn_starts(data, vocab, prompt_len):
    """Where the speeches of a 1-D token tensor begin, after a blank line and the speaker's name
    ('\\n\\nROMEO:\\n'), with prompt_len tokens before: a LongTensor of positions (none: an error)."""
    text = decode(data, vocab)
    starts = [m.end() for m in re.finditer(r'\n\n[^\n]+:\n', text) if m.end() >= prompt_len]
    if not starts:
        raise MinibardError("the text has no speech start (a blank line, then a speaker's name and a colon "
                            'on a line of its own) in its training or validation part: minibard needs a play')
    return torch.tensor(starts, dtype=torch.long)


def sample_prompts(data, starts, n, length, generator):
    """n prompts: the `length` tokens before a random speech start of `starts` -> (n, length)."""
    ix = starts[torch.randint(len(starts), (n,), generator=generator)]
    return torch.stack([data[i - length:i] for i in ix])


@torch.no_grad()
def sample_answers(model, prompts, max_len, stop, temperature, generator, batch=1024, top_k=None,
                   on_progress=None):
    """One turn after each prompt (N, Tp), ended by the tokens `stop`: answers (N, Ta) padded
    after their end and lengths (N,); Ta is the longest answer, at most max_len. on_progress(n),
    if given, is called after each generate() call of n rows (a plumbing.progress counter)."""
    outs = []
    for i in range(0, len(prompts), batch):
        outs.append(model.generate(prompts[i:i + batch], max_len, temperature=temperature, top_k=top_k,
                                   generator=generator, stop=stop))
        if on_progress:
            on_progress(len(outs[-1][0]))
    Ta = max(o[1].size(1) for o in outs)
    pad = stop[-1] if stop else 0
    answers = [F.pad(out[:, prompts.size(1):], (0, Ta - (out.size(1) - prompts.size(1))), value=pad)
               for out, _, _ in outs]
    return torch.cat(answers), torch.cat([lengths for *_, lengths in outs])


def forward_in_chunks(fn, seqs, lengths, prompt_len, chunk):
    """fn over prompt + answer sequences (N, Tp + Ta) with answer lengths (N,), `chunk` rows at a
    time, shortest answers first, each chunk cut to its longest answer: the padding after the
    answers is hardly ever computed, and a small chunk stays in the CPU's cache. fn(seqs (b, Tp + t),
    lengths (b,)) returns a tensor (b,) or (b, t), or a tuple of them; -> the same for all N rows,
    in the order given, (N, t) ones padded with zeros to (N, Ta)."""
    Ta = seqs.size(1) - prompt_len
    order = lengths.argsort(stable=True)
    parts = []
    for i in order.split(chunk):
        out = fn(seqs[i, :prompt_len + int(lengths[i].max())], lengths[i])
        parts.append(out if isinstance(out, tuple) else (out,))
    back = order.argsort()  # row k of the sorted batch -> k
    outs = tuple(torch.cat([F.pad(p, (0, Ta - p.size(1))) if p.dim() == 2 else p for p in ps])[back]
                 for ps in zip(*parts))
    return outs if isinstance(out, tuple) else outs[0]


def answer_mask(lengths, width):
    """(B, width) float mask: 1 on the first lengths[b] positions of each row (the answer), 0 after."""
    return (torch.arange(width, device=lengths.device) < lengths[:, None]).float()


def masked_mean(x, mask):
    """Mean of x over the positions where mask (same shape, 0/1) is 1: padding does not count."""
    return (x * mask).sum() / mask.sum()


def whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the answer tokens (mask 1); padding stays 0."""
    mean = masked_mean(x, mask)
    return (x - mean) / (masked_mean((x - mean) ** 2, mask).sqrt() + eps) * mask


def answer_sum(x, mask):
    """sum_t x_t over each answer's tokens (mask 1), averaged over the answers: (B, Ta) -> float."""
    return (x * mask).sum(1).mean().item()


def ends_turn(answers, lengths, stop):
    """True where an answer (N, Ta), within its length (N,), ends with the tokens `stop`: the
    speaker stopped, rather than running into max_answer_len. -> (N,) bool."""
    at = (lengths[:, None] - len(stop) + torch.arange(len(stop), device=lengths.device)).clamp(min=0)
    stop = torch.tensor(stop, device=answers.device)
    return (lengths >= len(stop)) & (answers.gather(1, at) == stop).all(1)


def answer_texts(answers, lengths, vocab):
    """Each answer (N, Ta) up to its length, as a string."""
    return [decode(a[:n], vocab) for a, n in zip(answers.tolist(), lengths.tolist())]


# ------------------------------------------------------------------ turns in the chat
TAG = re.compile(r"\n[A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*){0,3}:\n")  # a speaker's name on a line of its own


def clean(text, vocab):
    """Drop characters the model never saw; returns (kept text, dropped characters)."""
    dropped = ''.join(sorted(set(ch for ch in text if ch not in vocab)))
    return ''.join(ch for ch in text if ch in vocab), dropped


def format_chat(turns, bard, max_chars):
    """The play format of input.txt: 'NAME:\\nline\\n\\n' per turn, then 'BARD:\\n' to answer.

    Oldest turns are dropped until the prompt fits in max_chars; if the newest turn alone does
    not fit, its tail is kept (the model has only block_size characters of context)."""
    tail = f'{bard}:\n'
    for first in range(len(turns)):
        prompt = ''.join(f'{who}:\n{line}\n\n' for who, line in turns[first:]) + tail
        if len(prompt) <= max_chars:
            return prompt
    return prompt[-max_chars:]


def end_of_turn(answer):
    """The answer up to the end of its turn: the blank line before the next speaker, or a line that
    names another speaker (input.txt always puts a blank line first; the model may not).
    Returns (text, finished: whether the turn ended there rather than running out)."""
    text, finished = answer.split(END_OF_TURN)[0], END_OF_TURN in answer
    tag = TAG.search('\n' + text + '\n')  # also a name on the answer's first line
    if tag:
        text, finished = text[:max(0, tag.start() - 1)], True
    return text.strip('\n'), finished


def trim_to_whole(text, finished):
    """What the chat shows of a turn: a finished one whole; one that ran into the length limit
    trimmed back to its last whole line or sentence (. ! ? ; :), or with neither to its last
    whole word, so that no answer is shown cut mid-word. -> (shown, how: '', 'line', 'sentence',
    'word' or 'none')."""
    if finished:
        return text, ''
    ends = [(p, 'line') for p in range(1, len(text)) if text[p] == '\n']
    ends += [(p + 1, 'sentence') for p in range(len(text)) if text[p] in '.!?;:'
             and (p + 1 == len(text) or text[p + 1] in ' \n')]
    if ends:
        p, how = max(ends)
        return text[:p].rstrip(), how
    if ' ' in text.strip():
        return text.strip()[:text.strip().rindex(' ')], 'word'
    return text, 'none'


def as_turns(texts, vocab, device='cpu'):
    """Answers as the scene holds them, each text then the blank line that ends a turn, encoded and
    padded after its end: -> (answers (N, Ta), lengths (N,)), what the RM scores in both chat modes."""
    ids = [encode(text + END_OF_TURN, vocab) for text in texts]
    lengths = torch.tensor([len(t) for t in ids], device=device)
    answers = torch.full((len(ids), int(lengths.max())), ids[0][-1], device=device)  # pad: the end token
    for i, t in enumerate(ids):
        answers[i, :len(t)] = torch.tensor(t, device=device)
    return answers, lengths
