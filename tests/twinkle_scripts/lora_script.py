"""LoRA fine-tuning of the tiny Qwen3 on two ranks: an ordinary Twinkle script, recording every step exactly.

Run with ``python tests/twinkle_scripts/lora_script.py --backend ray --assets DIR --out lora.json``; ``--backend dask``
runs the same script on twinkle_dask's bridge. Both runs must write the same ``exact`` tree.

Three optimizer steps of ``forward_backward`` + ``clip_grad_and_step`` on a remote DataLoader (the batch goes
from the DataLoader's worker to the model's workers as a lazy result), LoRA with dropout (so the seeded random
streams are consumed), float32 throughout. Per step it records the loss returned by ``forward_backward``, the
gradient norm (``clip_grad_norm`` before the optimizer step) and ``calculate_metric(is_training=True)``.
"""

from __future__ import annotations

import os
import time

import cpu_platform

cpu_platform.apply()

from assets import build_assets  # noqa: E402
from script_utils import deterministic_metric, parse_args, tensor_digest, write_result  # noqa: E402

STEPS = 3
BATCH_SIZE = 8
WORLD_SIZE = 2


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    started = time.perf_counter()
    if args.backend == 'dask':
        import twinkle_dask.bridge  # noqa: F401

    import twinkle
    from peft import LoraConfig
    from twinkle import DeviceGroup, DeviceMesh
    from twinkle.dataloader import DataLoader
    from twinkle.dataset import Dataset, DatasetMeta
    from twinkle.model import TransformersModel
    from twinkle.preprocessor.llm import GSM8KProcessor

    assets = build_assets(args.assets)
    model_dir = str(assets / 'model')
    data_file = str(assets / 'data.jsonl')

    def create_dataset() -> Dataset:
        dataset = Dataset(dataset_meta=DatasetMeta(data_file))
        dataset.set_template('Template', model_id=model_dir, max_length=512)
        dataset.map(GSM8KProcessor(add_assistant=True))
        dataset.encode()
        return dataset

    twinkle.initialize(
        mode=args.backend,
        nproc_per_node=WORLD_SIZE,
        groups=[DeviceGroup(name='model', ranks=list(range(WORLD_SIZE)), device_type='GPU')],
        seed=42,
    )
    mesh = DeviceMesh.from_sizes(world_size=WORLD_SIZE, dp_size=WORLD_SIZE)
    model = TransformersModel(model_id=model_dir, device_mesh=mesh, remote_group='model', mixed_precision='no')
    model.add_adapter_to_model(
        'default', LoraConfig(target_modules='all-linear', r=4, lora_alpha=8, lora_dropout=0.1))
    model.set_optimizer('AdamW', lr=1e-2)
    model.set_lr_scheduler('CosineAnnealingLR', T_max=STEPS, eta_min=0)
    model.set_template('Template', model_id=model_dir)

    dataloader = DataLoader(
        dataset=create_dataset, batch_size=BATCH_SIZE, device_mesh=mesh, remote_group='model', num_workers=0)

    steps, timing = [], []
    for step, batch in enumerate(dataloader):
        if step >= STEPS:
            break
        outputs = model.forward_backward(inputs=batch)
        loss = outputs()['loss'] if callable(outputs) else outputs['loss']
        model.clip_grad_and_step(max_grad_norm=1.0)
        metric = model.calculate_metric(is_training=True)
        trainable = model.get_state_dict()
        digest = tensor_digest(trainable() if callable(trainable) else trainable)
        steps.append({'loss': loss, 'metric': deterministic_metric(metric), 'lora_weights': digest})
        timing.append({k: v for k, v in metric.items() if k not in deterministic_metric(metric)})
        print(f'[lora step {step + 1}] loss={loss} metric={metric} lora={digest}', flush=True)

    saved = model.save('lora-final', output_dir=str(assets / 'out' / f'lora-{args.backend}'))
    saved = saved() if callable(saved) else saved
    values = {'steps': steps, 'saved': os.path.basename(str(saved))}
    result = write_result(args.out, 'lora', args.backend, values, started, timing=timing)
    print(f'wrote {args.out} in {result["wall_s"]} s', flush=True)


if __name__ == '__main__':
    main()
