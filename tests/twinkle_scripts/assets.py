"""Local assets for the Twinkle reference scripts: a tiny Qwen3 model and a GSM8K-like dataset.

``build_assets(dirpath)`` writes, deterministically and without any network access:

* ``dirpath/model``: a two-layer Qwen3 causal LM (hidden size 32, float32, random weights from a fixed seed)
  and a byte-level BPE tokenizer trained on the spot on the dataset text, with the ChatML special tokens and
  chat template that Twinkle's ``Template`` renders;
* ``dirpath/data.jsonl``: 64 arithmetic word problems, ``{"question": ..., "answer": "... #### <n>"}``.

Building takes about a second; a second call with the same ``dirpath`` finds the stamp file and returns at once.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

#: Bump when the assets change, so an old folder is rebuilt instead of reused.
ASSETS_VERSION = '1'
NUM_ROWS = 64
VOCAB_SIZE = 384
SPECIAL_TOKENS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<think>', '</think>']

# ChatML, as Qwen3 renders it without tools; ``generation`` blocks let Twinkle mask the assistant turns.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_NAMES = ['Ada', 'Ben', 'Cleo', 'Dev', 'Eva', 'Finn', 'Gia', 'Hugo']
_ITEMS = ['apples', 'pencils', 'marbles', 'stickers', 'books', 'coins']


def _rows() -> list[dict[str, str]]:
    """The dataset rows: small two-step word problems with their worked answers."""
    rng = random.Random(1234)
    rows = []
    for _ in range(NUM_ROWS):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b, c = rng.randint(2, 20), rng.randint(2, 9), rng.randint(1, 15)
        total = a * b - c
        question = (f'{name} has {b} boxes with {a} {item} in each box. '
                    f'{name} gives away {c} {item}. How many {item} are left?')
        answer = (f'{name} starts with {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {item}.\n'
                  f'After giving away {c}, {a * b} - {c} = <<{a * b}-{c}={total}>>{total} are left.\n'
                  f'#### {total}')
        rows.append({'question': question, 'answer': answer})
    return rows


def _train_tokenizer(rows: list[dict[str, str]], model_dir: Path) -> int:
    """Train a byte-level BPE tokenizer on ``rows`` and save it; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [row['question'] + '\n' + row['answer'] for row in rows]
    corpus += ['You are a helpful math assistant. How are you? Fine. \\boxed{42}', 'system user assistant']
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token='<|im_end|>',
        pad_token='<|endoftext|>',
        bos_token=None,
        unk_token=None,
        model_max_length=4096,
        padding_side='right',
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(model_dir))
    return len(fast)


def _build_model(model_dir: Path, vocab_size: int) -> None:
    """Save a two-layer float32 Qwen3 with weights drawn from a fixed seed."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids('<|im_end|>'),
        pad_token_id=tokenizer.convert_tokens_to_ids('<|endoftext|>'),
        torch_dtype='float32',
        attn_implementation='eager',
    )
    config.architectures = ['Qwen3ForCausalLM']
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).to(torch.float32)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(str(model_dir), safe_serialization=True)


def build_assets(dirpath: str | os.PathLike[str]) -> Path:
    """Create the model and dataset under ``dirpath`` (once) and return ``dirpath`` as a ``Path``.

    Parameters
    ----------
    dirpath : str or os.PathLike
        Folder to fill; created if missing. It receives ``model/`` and ``data.jsonl``.

    Returns
    -------
    pathlib.Path
        The folder, resolved to an absolute path.
    """
    root = Path(dirpath).resolve()
    stamp = root / '.assets-version'
    if stamp.exists() and stamp.read_text() == ASSETS_VERSION:
        return root
    model_dir = root / 'model'
    model_dir.mkdir(parents=True, exist_ok=True)
    rows = _rows()
    with open(root / 'data.jsonl', 'w', encoding='utf-8') as f:
        for row in rows:
            f.write(json.dumps(row) + '\n')
    vocab_size = _train_tokenizer(rows, model_dir)
    _build_model(model_dir, vocab_size)
    stamp.write_text(ASSETS_VERSION)
    return root


if __name__ == '__main__':
    print(build_assets(sys.argv[1] if len(sys.argv) > 1 else 'twinkle-assets'))
