"""Twinkle's own components on twinkle_dask's bridge give Twinkle-on-Ray's results, bit for bit.

The three scripts here are ordinary Twinkle scripts (LoRA training; the control flow of the cookbook's GRPO
``main()``; the control flow of the cookbook's DPO ``main()``); each is run once on Ray and once on the bridge
(``--backend dask``: the script adds ``import twinkle_dask.bridge`` and writes ``mode='dask'``, nothing else),
and the ``exact`` trees they write (every float as ``float.hex()``, weight digests after every step) must be
equal. Also: the assets and the gloo
checkpoint engine the scripts use.

Needs the Twinkle environment (``source ci/twinkle_env.sh``); each test skips when its packages are missing.
Twinkle has no CPU platform: the scripts patch it to CPU/gloo (``cpu_platform.py``, tests only), which Ray
workers apply through a worker setup hook and Dask workers through a preload set in Dask's configuration.
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


def _run(script: str, backend: str, assets: Path, out: Path) -> dict:
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}
    if backend == 'dask':
        # Dask's configuration only: 'GPU' groups as simulated GPU workers, the CPU patch as a worker preload.
        env.update({'DASK_TWINKLE_DASK__SIMULATE_GPUS': 'true',
                    'DASK_DISTRIBUTED__WORKER__PRELOAD': '["cpu_platform"]'})
    proc = subprocess.run([sys.executable, str(HERE / script), '--backend', backend, '--assets', str(assets),
                           '--out', str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _need_both_backends() -> None:
    for module in ('ray', TWINKLE, 'peft', 'transformers', 'twinkle_dask.bridge'):
        pytest.importorskip(module)


def _on_both_backends(name: str, assets: Path, tmp_path: Path) -> dict:
    """Run ``<name>_script.py`` on Ray, then on the bridge; their ``exact`` trees must be equal. The bridge's run."""
    _need_both_backends()
    ray_run = _run(f'{name}_script.py', 'ray', assets, tmp_path / f'{name}-ray.json')
    dask_run = _run(f'{name}_script.py', 'dask', assets, tmp_path / f'{name}-dask.json')
    print(f"{name} wall time: ray {ray_run['wall_s']} s, dask {dask_run['wall_s']} s")
    assert dask_run['exact'] == ray_run['exact']
    return dask_run


@pytest.fixture(scope='module')
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp('twinkle-assets')


@pytest.mark.timeout(900)
def test_lora_training_on_the_bridge_equals_ray(assets: Path, tmp_path: Path) -> None:
    dask_run = _on_both_backends('lora', assets, tmp_path)
    steps = dask_run['values']['steps']
    assert len(steps) == 3
    assert all(math.isfinite(step['loss']) and step['loss'] > 0 for step in steps)
    assert len({step['lora_weights']['sha256'] for step in steps}) == 3  # LoRA weights moved every step
    assert [step['metric']['iters'] for step in steps] == [0, 1, 2]
    assert dask_run['values']['saved'] == 'lora-final'


@pytest.mark.timeout(900)
def test_grpo_control_flow_on_the_bridge_equals_ray(assets: Path, tmp_path: Path) -> None:
    dask_run = _on_both_backends('grpo', assets, tmp_path)
    values = dask_run['values']
    assert values['optim_steps'] == 2 and len(values['steps']) == 2
    first, second = values['steps']
    # The sampler's weights equal the model's after each sync: the base weights, then the LoRA ones.
    assert first['weights_match'] and second['weights_match']
    assert first['syncs'] == [1, 1] and second['syncs'] == [2, 2]
    assert first['model_weights']['count'] == 25 and second['model_weights']['count'] == 28
    for step in values['steps']:
        assert len(step['tokens']) == len(step['old_logps']) == len(step['rewards']) == 8
        assert all(len(t) == len(lp) for t, lp in zip(step['tokens'], step['old_logps']))
        assert len(step['losses']) == 1 and math.isfinite(step['losses'][0])
    assert 'adapter_model.safetensors' in values['saved_files']


@pytest.mark.timeout(900)
def test_dpo_control_flow_on_the_bridge_equals_ray(assets: Path, tmp_path: Path) -> None:
    dask_run = _on_both_backends('dpo', assets, tmp_path)
    values = dask_run['values']
    steps = values['steps']
    assert values['optim_steps'] == 3 and len(steps) == 3
    for step in steps:
        assert (step['pairs'], step['sequences']) == (4, 8)
        assert math.isfinite(step['loss']) and step['loss'] > 0
        # The reference outputs went from the reference group's workers to the policy's, not through the driver.
        assert step['ref_outputs_lazy'] and not step['ref_outputs_collected_in_driver']
        assert step['metric']['loss'] == f"{step['loss']:.4f}"
    # The policy's weights moved every step, away from the initial ones; the final checkpoint holds the last ones.
    digests = [values['initial_weights']['sha256']] + [step['policy_weights']['sha256'] for step in steps]
    assert len(set(digests)) == 4
    assert values['saved_weights'] == steps[-1]['policy_weights']
    assert steps[-1]['policy_weights']['count'] == 25
    # Step 1: the policy still equals the reference, so the reference log-probabilities reached the right ranks
    # for the right sequences exactly when the DPO rewards are zero; afterwards the chosen answers gain.
    first = steps[0]['metric']
    assert (first['logps/ref_chosen'], first['logps/ref_rejected']) == (first['logps/chosen'], first['logps/rejected'])
    assert first['rewards/margins'] == '0.0000' and first['rewards/accuracies'] == '0.0%'
    assert all(float(step['metric']['rewards/margins']) > 0 for step in steps[1:])
    assert [step['metric']['iters'] for step in steps] == [0, 1, 2]
    assert [step['saved'] for step in steps] == [None, 'dpo-checkpoint-2', None]
    assert values['saved'] == 'dpo-final-checkpoint' and 'model.safetensors' in values['saved_files']
