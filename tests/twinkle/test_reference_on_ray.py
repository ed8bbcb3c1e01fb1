"""The Twinkle reference assets, the gloo checkpoint engine, and the two scripts run twice on Ray.

Needs the Twinkle environment (``source ci/twinkle_env.sh``); each test skips when its packages are missing.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# ``twinkle.infra``, not ``twinkle``: without twinkle-kit, ``import twinkle`` finds this folder (``tests/`` is on
# ``sys.path`` under pytest) as a namespace package.
TWINKLE = 'twinkle.infra'


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.mark.timeout(120)
def test_assets_are_deterministic_and_built_once(tmp_path: Path) -> None:
    pytest.importorskip('tokenizers')
    pytest.importorskip('transformers')
    from assets import NUM_ROWS, build_assets

    first, second = build_assets(tmp_path / 'a'), build_assets(tmp_path / 'b')
    assert _files(first) == _files(second)
    stamp_mtime = (first / 'model' / 'model.safetensors').stat().st_mtime_ns
    assert build_assets(first) == first
    assert (first / 'model' / 'model.safetensors').stat().st_mtime_ns == stamp_mtime

    config = json.loads((first / 'model' / 'config.json').read_text())
    assert (config['model_type'], config['hidden_size'], config['num_hidden_layers'], config['dtype']) == (
        'qwen3', 32, 2, 'float32')
    rows = [json.loads(line) for line in (first / 'data.jsonl').read_text().splitlines()]
    assert len(rows) == NUM_ROWS
    assert all(row['answer'].rsplit('#### ', 1)[1].lstrip('-').isdigit() for row in rows)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(first / 'model'))
    text = tokenizer.apply_chat_template([{'role': 'user', 'content': 'Hi'}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n'
    assert tokenizer.eos_token == '<|im_end|>' and len(tokenizer) == config['vocab_size']


@pytest.mark.timeout(120)
def test_gloo_checkpoint_engine_broadcasts_every_tensor_exactly() -> None:
    torch = pytest.importorskip('torch')
    pytest.importorskip(TWINKLE)
    from cpu_platform import GlooCheckpointEngine

    weights = {
        'a.weight': torch.randn(3, 5, generator=torch.Generator().manual_seed(0)),
        'b.bias': torch.arange(7, dtype=torch.int64),
        'c.half': torch.linspace(-1, 1, 9).to(torch.bfloat16),
    }
    master = GlooCheckpointEngine()
    master.is_master = True
    metadata = master.prepare()
    assert master.prepare() is metadata
    trainer_kwargs, rollout_kwargs = GlooCheckpointEngine.build_topology(2, 2, [metadata])
    assert trainer_kwargs['rank'] == [0, -1] and rollout_kwargs['rank'] == [1, 2]
    assert trainer_kwargs['world_size'] == [3, 3] and rollout_kwargs['world_size'] == [3, 3]
    idle = GlooCheckpointEngine()
    receivers = [GlooCheckpointEngine(), GlooCheckpointEngine()]
    assert idle.prepare() is None

    def init(engine: GlooCheckpointEngine, rank: int) -> None:
        engine.init_process_group(rank=rank, world_size=3, master_metadata=metadata)

    threads = [threading.Thread(target=init, args=(e, r)) for e, r in [(master, 0), (idle, -1),
                                                                       *zip(receivers, (1, 2))]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)

    for round_ in range(2):
        sent = {name: tensor + round_ if tensor.is_floating_point() else tensor * round_
                for name, tensor in weights.items()}
        received: list[dict[str, object]] = [{}, {}]

        async def collect(engine: GlooCheckpointEngine, into: dict[str, object]) -> None:
            async for name, tensor in engine.receive_weights():
                into[name] = tensor.clone()

        workers = [threading.Thread(target=asyncio.run, args=(master.send_weights(iter(sent.items())), )),
                   threading.Thread(target=asyncio.run, args=(idle.send_weights(iter(sent.items())), ))]
        workers += [threading.Thread(target=asyncio.run, args=(collect(e, into), ))
                    for e, into in zip(receivers, received)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        assert not any(worker.is_alive() for worker in workers)
        for into in received:
            assert list(into) == list(sent)
            for name, tensor in sent.items():
                got = into[name]
                assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor), name


def _run(script: str, assets: Path, out: Path) -> dict:
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}
    proc = subprocess.run([sys.executable, str(HERE / script), '--backend', 'ray', '--assets', str(assets),
                           '--out', str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_scripts_on_ray_write_identical_results_twice(tmp_path: Path) -> None:
    for module in ('ray', TWINKLE, 'peft', 'transformers'):
        pytest.importorskip(module)
    assets = tmp_path / 'assets'

    lora = [_run('lora_script.py', assets, tmp_path / f'lora{i}.json') for i in range(2)]
    assert lora[0]['exact'] == lora[1]['exact']
    steps = lora[0]['values']['steps']
    assert len(steps) == 3
    assert all(math.isfinite(step['loss']) and step['loss'] > 0 for step in steps)
    assert len({step['lora_weights']['sha256'] for step in steps}) == 3
    assert [step['metric']['iters'] for step in steps] == [0, 1, 2]
    assert lora[0]['values']['saved'] == 'lora-final'

    grpo = [_run('grpo_script.py', assets, tmp_path / f'grpo{i}.json') for i in range(2)]
    assert grpo[0]['exact'] == grpo[1]['exact']
    values = grpo[0]['values']
    assert values['optim_steps'] == 2 and len(values['steps']) == 2
    first, second = values['steps']
    assert first['weights_match'] and second['weights_match']
    assert first['syncs'] == [1, 1] and second['syncs'] == [2, 2]
    assert first['model_weights']['count'] == 25 and second['model_weights']['count'] == 28
    for step in values['steps']:
        assert len(step['tokens']) == len(step['old_logps']) == len(step['rewards']) == 8
        assert all(len(t) == len(lp) for t, lp in zip(step['tokens'], step['old_logps']))
        assert len(step['losses']) == 1 and math.isfinite(step['losses'][0])
    assert 'adapter_model.safetensors' in values['saved_files']
