"""DPO on the tiny Qwen3: the control flow of Twinkle's cookbook ``dpo_full.py``, on CPU, recorded exactly.

Run with ``python tests/twinkle_scripts/dpo_script.py --backend ray --assets DIR --out dpo.json``; ``--backend dask``
runs the same script on twinkle_dask's bridge. Both runs must write the same ``exact`` tree.

The cookbook's Transformers path: a 'policy' group and a 'reference' group (two ranks each, ``device_type='GPU'``),
a DataLoader built in the driver (no ``remote_group``) over a preference dataset whose rows hold an encoded
``positive`` and ``negative`` trajectory, ``prepare_dpo_batch`` interleaving them as ``[pos_1, neg_1, ...]``,
``ref_model.forward_only(inputs=...)`` whose lazy result goes straight into
``policy_model.forward_backward(inputs=..., ref_outputs=...)`` (handed from the reference group's workers to the
policy group's workers, never collected in the driver), ``DPOLoss`` (``loss_type='sigmoid'``, the CLI's defaults
``beta=0.1``, ``sft_weight=1.0``), ``DPOMetric``, ``clip_grad_and_step``, ``calculate_metric``, ``save`` every
``SAVE_STEPS`` and at the end, and ``get_device_placement``.

Differences from the cookbook. Forced by running without a GPU or a model hub: the local tiny model and dataset
(``assets.py``), float32 (``mixed_precision='no'``), two ranks per group with a data-parallel policy mesh as in
the other scripts here (the cookbook's ``fsdp_size=2, dp_size=2`` is for four), and the preference pairs:
``GSM8KPairProcessor`` (``EmojiDPOProcessor`` on the GSM8K-like rows) takes the question as the prompt, the
worked answer as the chosen response and a wrong one (its first line, then a final answer off by ten) as the
rejected response. Chosen for a short run: 4 pairs per step, 3 steps, a checkpoint at step 2, ``max_length=512``,
and a learning rate of 1e-3 (the cookbook's 1e-5 would not move the two-decimal DPO metrics in three steps).

Per step it records the loss returned by ``forward_backward``, ``calculate_metric(is_training=True)`` (the DPO
metrics, reference log-probabilities included), the SHA-256 of the policy's weights after the optimizer step and
whether the reference outputs stayed lazy (never collected in the driver); at the end, the SHA-256 of the final
checkpoint's ``model.safetensors``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import cpu_platform

cpu_platform.apply()

from assets import build_assets  # noqa: E402
from script_utils import deterministic_metric, parse_args, tensor_digest, write_result  # noqa: E402

MODEL_GPUS = 2
REF_MODEL_GPUS = 2
NUM_GPUS = MODEL_GPUS + REF_MODEL_GPUS
MAX_STEPS = 3
BATCH_SIZE = 4  # preference pairs per step: 8 sequences, 4 (two pairs) per rank
LEARNING_RATE = 1e-3
DPO_BETA = 0.1
SFT_WEIGHT = 1.0
LOSS_TYPE = 'sigmoid'
SAVE_STEPS = 2
MAX_LENGTH = 512
GRADIENT_ACCUMULATION_STEPS = 1
SYSTEM_PROMPT = 'You are a helpful assistant.'


def prepare_dpo_batch(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cookbook's interleaving: ``[pos_1, neg_1, pos_2, neg_2, ...]``, each with the row's other fields."""
    result = []
    for row in batch:
        base_fields = {k: v for k, v in row.items() if k not in ('positive', 'negative')}
        result.append({**base_fields, **row['positive']})
        result.append({**base_fields, **row['negative']})
    return result


def collected_in_driver(lazy: Any) -> bool:
    """Whether a lazy remote result was collected in this process (Ray's ``LazyCollect`` or the bridge's)."""
    if hasattr(lazy, '_value_set'):  # twinkle_dask.LazyResult
        return bool(lazy._value_set)
    return getattr(lazy, '_result', None) is not None  # Twinkle's Ray LazyCollect


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    max_steps = args.steps or MAX_STEPS
    started = time.perf_counter()
    if args.backend == 'dask':
        import twinkle_dask.bridge  # noqa: F401

    import twinkle
    from twinkle import DeviceGroup, DeviceMesh, get_device_placement, get_logger
    from twinkle.dataloader import DataLoader
    from twinkle.dataset import Dataset, DatasetMeta
    from twinkle.loss import DPOLoss
    from twinkle.metric import DPOMetric
    from twinkle.model import TransformersModel
    from twinkle.preprocessor import EmojiDPOProcessor
    from twinkle.processor import InputProcessor

    logger = get_logger()
    assets = build_assets(args.assets)
    model_id = str(assets / 'model')
    data_file = str(assets / 'data.jsonl')
    output_dir = str(assets / 'out' / f'dpo-{args.backend}')

    class GSM8KPairProcessor(EmojiDPOProcessor):
        """Preference pairs from the GSM8K-like rows: the worked answer is chosen, a wrong final answer rejected."""

        def preprocess(self, row: dict[str, Any]) -> dict[str, Any]:
            first_line, _, final = row['answer'].rpartition('\n#### ')
            first_line = first_line.split('\n', 1)[0]
            rejected = f'{first_line}\n#### {int(final) + 10}'
            return super().preprocess({**row, 'rejected': rejected})

    def create_dpo_dataset() -> Dataset:
        dataset = Dataset(DatasetMeta(data_file))
        dataset.set_template('Template', model_id=model_id, max_length=MAX_LENGTH)
        dataset.map(GSM8KPairProcessor, init_args={
            'system': SYSTEM_PROMPT,
            'prompt_key': 'question',
            'chosen_key': 'answer',
            'rejected_key': 'rejected',
        })
        dataset.encode(load_from_cache_file=False)
        return dataset

    device_groups = [
        DeviceGroup(name='policy', ranks=list(range(MODEL_GPUS)), device_type='GPU'),
        DeviceGroup(name='reference', ranks=list(range(MODEL_GPUS, NUM_GPUS)), device_type='GPU'),
    ]
    policy_mesh = DeviceMesh.from_sizes(world_size=MODEL_GPUS, dp_size=MODEL_GPUS)
    ref_mesh = DeviceMesh.from_sizes(world_size=REF_MODEL_GPUS, dp_size=REF_MODEL_GPUS)
    twinkle.initialize(mode=args.backend, nproc_per_node=NUM_GPUS, groups=device_groups, seed=42)

    dataloader = DataLoader(
        dataset=create_dpo_dataset,
        batch_size=BATCH_SIZE,
        min_batch_size=BATCH_SIZE,
        device_mesh=policy_mesh,
    )

    policy_model = TransformersModel(
        model_id=model_id, device_mesh=policy_mesh, remote_group='policy', mixed_precision='no')
    loss_fn = DPOLoss(beta=DPO_BETA, loss_type=LOSS_TYPE, reference_free=False, sft_weight=SFT_WEIGHT)
    policy_model.set_optimizer('AdamW', lr=LEARNING_RATE, weight_decay=0.01)
    policy_model.set_lr_scheduler('CosineAnnealingLR', T_max=max_steps, eta_min=LEARNING_RATE * 0.1)
    policy_model.set_loss(loss_fn)
    policy_model.add_metric(DPOMetric, beta=DPO_BETA)
    policy_model.set_processor(InputProcessor)
    policy_model.set_template('Template', model_id=model_id)

    ref_model = TransformersModel(
        model_id=model_id, device_mesh=ref_mesh, remote_group='reference', mixed_precision='no')
    ref_model.set_processor(InputProcessor)
    ref_model.set_template('Template', model_id=model_id)

    from safetensors.torch import load_file
    initial_digest = tensor_digest(load_file(str(assets / 'model' / 'model.safetensors')))

    placement = get_device_placement()
    logger.info(placement)
    logger.info(f'Starting DPO training (Transformers): loss_type={LOSS_TYPE}, beta={DPO_BETA}')

    optim_step = 0
    steps: list[dict[str, Any]] = []
    timing: dict[str, Any] = {'metrics': [], 'step_s': [], 'setup_s': time.perf_counter() - started}
    last = time.perf_counter()
    for batch in dataloader:
        if optim_step >= max_steps:
            break
        dpo_batch = prepare_dpo_batch(batch)
        ref_outputs = ref_model.forward_only(inputs=dpo_batch)  # lazy: not collected in the driver
        outputs = policy_model.forward_backward(inputs=dpo_batch, ref_outputs=ref_outputs)
        loss = outputs()['loss'] if callable(outputs) else outputs['loss']
        policy_model.clip_grad_and_step()
        optim_step += 1

        metric: dict[str, Any] = {}
        if optim_step % GRADIENT_ACCUMULATION_STEPS == 0:
            metric = policy_model.calculate_metric(is_training=True)
            logger.info(f'[Step {optim_step}/{max_steps}] {metric}')
        saved_in_loop = None
        if optim_step % SAVE_STEPS == 0:
            saved_in_loop = policy_model.save(f'dpo-checkpoint-{optim_step}', output_dir=output_dir)
            saved_in_loop = os.path.basename(str(saved_in_loop() if callable(saved_in_loop) else saved_in_loop))
        weights = policy_model.get_state_dict()
        digest = tensor_digest(weights() if callable(weights) else weights)
        steps.append({
            'pairs': len(batch),
            'sequences': len(dpo_batch),
            'loss': loss,
            'metric': deterministic_metric(metric),
            'policy_weights': digest,
            'ref_outputs_lazy': callable(ref_outputs) and not isinstance(ref_outputs, dict),
            'ref_outputs_collected_in_driver': collected_in_driver(ref_outputs),
            'saved': saved_in_loop,
        })
        timing['metrics'].append({k: v for k, v in metric.items() if k not in deterministic_metric(metric)})
        timing['step_s'].append(time.perf_counter() - last)
        last = time.perf_counter()
        print(f'[dpo step {optim_step}] loss={loss} metric={metric} policy={digest}', flush=True)

    logger.info(f'Training completed. Total steps: {optim_step}')
    saved = policy_model.save('dpo-final-checkpoint', output_dir=output_dir)
    saved = saved() if callable(saved) else saved
    final = sorted(os.listdir(os.path.join(output_dir, 'dpo-final-checkpoint')))
    saved_digest = tensor_digest(load_file(os.path.join(output_dir, 'dpo-final-checkpoint', 'model.safetensors')))
    values = {'initial_weights': initial_digest, 'steps': steps, 'optim_steps': optim_step,
              'saved': os.path.basename(str(saved)), 'saved_files': final, 'saved_weights': saved_digest,
              'placement': placement}
    result = write_result(args.out, 'dpo', args.backend, values, started, timing=timing)
    print(f'wrote {args.out} in {result["wall_s"]} s', flush=True)


if __name__ == '__main__':
    main()
