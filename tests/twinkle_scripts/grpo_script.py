"""GRPO on the tiny Qwen3: the control flow of Twinkle's cookbook ``short_math_grpo.py``, on CPU, recorded exactly.

Run with ``python tests/twinkle_scripts/grpo_script.py --backend ray --assets DIR --out grpo.json``; ``--backend dask``
runs the same script on twinkle_dask's bridge. Both runs must write the same ``exact`` tree.

Differences from the cookbook, all forced by running without a GPU or a model hub: the local tiny model and
dataset (``assets.py``), ``Template`` instead of ``Qwen3_5Template``, float32 (``mixed_precision='no'``), and
``ToySampler`` (``toy_sampler.py``) instead of ``vLLMSampler``. Everything else is the cookbook's: a remote
DataLoader on the model group, ``CheckpointEngineManager(model, sampler).sync_weights(merge_and_sync=False)``
(base weights on the first step, LoRA only afterwards; gloo engine from ``cpu_platform.py``), rewards,
``GRPOAdvantage``, ``forward_backward`` + ``clip_grad_and_step`` per mini batch, ``CompletionRewardMetric`` with
``calculate_metric``, ``save`` and ``get_device_placement``. A third reward (share of digits in the completion)
gives the random tiny model's completions different rewards, so the advantages and the GRPO loss are not zero.

Per step it records the sampled tokens and logprobs, the rewards and advantages, the metrics, and the SHA-256
of the sampler's weights after the sync next to the same digest computed from the model side (the base weights
file for the first sync, ``model.get_state_dict()`` for the LoRA syncs): ``weights_match`` must be true.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import cpu_platform

cpu_platform.apply()

from assets import build_assets  # noqa: E402
from script_utils import deterministic_metric, parse_args, tensor_digest, write_result  # noqa: E402

MODEL_GPUS = 2
SAMPLER_GPUS = 2
NUM_GPUS = MODEL_GPUS + SAMPLER_GPUS
NUM_GENERATIONS = 4
MAX_NEW_TOKENS = 8
LEARNING_RATE = 1e-2
MAX_STEPS = 2
BATCH_SIZE = 2
MINI_BATCH_SIZE = 8
MICRO_BATCH_SIZE = 2
ADAPTER_NAME = 'default'
SAVE_STEPS = 1
LORA_RANK = 4

SYSTEM_PROMPT = ('You are a helpful math assistant. Solve the problem with minimal but correct reasoning '
                 'and put your final answer within \\boxed{}.')


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    max_steps = args.steps or MAX_STEPS
    started = time.perf_counter()
    if args.backend == 'dask':
        import twinkle_dask.bridge  # noqa: F401

    import twinkle
    from peft import LoraConfig
    from toy_sampler import ToySampler, lora_key
    from twinkle import DeviceGroup, DeviceMesh, get_device_placement, get_logger
    from twinkle.advantage import GRPOAdvantage
    from twinkle.checkpoint_engine import CheckpointEngineManager
    from twinkle.data_format import SamplingParams
    from twinkle.dataloader import DataLoader
    from twinkle.dataset import Dataset, DatasetMeta
    from twinkle.metric import CompletionRewardMetric
    from twinkle.model import TransformersModel
    from twinkle.preprocessor.llm import GSM8KProcessor
    from twinkle.processor import InputProcessor
    from twinkle.reward import GSM8KAccuracyReward
    from twinkle.reward.base import Reward

    logger = get_logger()
    assets = build_assets(args.assets)
    model_id = str(assets / 'model')
    data_file = str(assets / 'data.jsonl')
    output_dir = str(assets / 'out' / f'grpo-{args.backend}')

    class GSM8KBrevityReward(Reward):
        """The cookbook's brevity reward: 0 without an answer, else 1 up to 300 characters, then less."""

        def __call__(self, trajectories: list[dict[str, Any]], **kwargs: Any) -> list[float]:
            rewards = []
            for traj in trajectories:
                completion = ''
                for msg in reversed(traj.get('messages', [])):
                    if msg.get('role') == 'assistant':
                        completion = msg.get('content', '')
                        break
                has_answer = bool(
                    re.search(r'\\boxed\{[^}]+\}', completion) or re.search(r'####\s*[\-\d,\.]+', completion))
                if not has_answer:
                    rewards.append(0.0)
                else:
                    length = len(completion)
                    rewards.append(1.0 if length <= 300 else max(0.0, 1.0 - (length - 300) / 3000))
            return rewards

    class DigitShareReward(Reward):
        """Share of digits among the completion's characters (0 for an empty completion)."""

        def __call__(self, trajectories: list[dict[str, Any]], **kwargs: Any) -> list[float]:
            rewards = []
            for traj in trajectories:
                completion = next(
                    (m.get('content', '') for m in reversed(traj.get('messages', [])) if m.get('role') == 'assistant'),
                    '')
                rewards.append(sum(c.isdigit() for c in completion) / len(completion) if completion else 0.0)
            return rewards

    def create_gsm8k_dataset() -> Dataset:
        dataset = Dataset()
        dataset.add_dataset(DatasetMeta(data_file))
        dataset.set_template('Template', model_id=model_id, max_length=512, truncation_strategy='delete')
        dataset.map(GSM8KProcessor(system=SYSTEM_PROMPT))
        dataset.encode(add_generation_prompt=True)
        return dataset

    def compute_rewards(trajectories: list[dict[str, Any]]) -> tuple[list[float], ...]:
        accuracy_rewards = GSM8KAccuracyReward()(trajectories)
        brevity_rewards = GSM8KBrevityReward()(trajectories)
        digit_rewards = DigitShareReward()(trajectories)
        total_rewards = [a + b + d for a, b, d in zip(accuracy_rewards, brevity_rewards, digit_rewards)]
        return total_rewards, brevity_rewards, accuracy_rewards, digit_rewards

    device_groups = [
        DeviceGroup(name='model', ranks=list(range(MODEL_GPUS)), device_type='GPU'),
        DeviceGroup(name='sampler', ranks=list(range(MODEL_GPUS, NUM_GPUS)), device_type='GPU'),
    ]
    model_mesh = DeviceMesh.from_sizes(world_size=MODEL_GPUS, dp_size=MODEL_GPUS)
    sampler_mesh = DeviceMesh.from_sizes(world_size=SAMPLER_GPUS, dp_size=SAMPLER_GPUS)
    twinkle.initialize(mode=args.backend, nproc_per_node=NUM_GPUS, groups=device_groups, seed=42, lazy_collect=False)

    lora_config = LoraConfig(
        target_modules='all-linear', r=LORA_RANK, lora_alpha=LORA_RANK * 2, lora_dropout=0.05)
    model = TransformersModel(model_id=model_id, device_mesh=model_mesh, remote_group='model', mixed_precision='no')
    model.add_adapter_to_model(ADAPTER_NAME, lora_config, gradient_accumulation_steps=1)
    model.set_optimizer('AdamW', lr=LEARNING_RATE)
    model.set_lr_scheduler('CosineAnnealingLR', T_max=max_steps, eta_min=0)
    model.set_loss('GRPOLoss', epsilon=0.2)
    model.set_processor(InputProcessor, padding_free=True)
    model.set_template('Template', model_id=model_id)

    sampler = ToySampler(model_id=model_id, device_mesh=sampler_mesh, remote_group='sampler')
    sampler.set_template('Template', model_id=model_id)

    ckpt_manager = CheckpointEngineManager(model=model, sampler=sampler)

    dataloader = DataLoader(
        dataset=create_gsm8k_dataset,
        batch_size=BATCH_SIZE,
        min_batch_size=BATCH_SIZE,
        device_mesh=model_mesh,
        remote_group='model',
        num_workers=0,
    )

    advantage_fn = GRPOAdvantage()
    metrics = CompletionRewardMetric()
    sampling_params = SamplingParams(max_tokens=MAX_NEW_TOKENS, num_samples=1, logprobs=1, temperature=1.0, top_p=0.95)

    from safetensors.torch import load_file
    base_digest = tensor_digest(load_file(str(assets / 'model' / 'model.safetensors')))

    placement = get_device_placement()
    logger.info(placement)
    optim_step = 0
    steps: list[dict[str, Any]] = []
    timing: dict[str, Any] = {'metrics': [], 'step_s': []}
    timing['setup_s'] = time.perf_counter() - started
    last = time.perf_counter()
    for batch in dataloader:
        if optim_step >= max_steps:
            break
        metrics.reset()
        expand_prompts = []
        for prompt in batch:
            expand_prompts.extend([prompt] * NUM_GENERATIONS)

        first_sync = not ckpt_manager.base_sync_done
        ckpt_manager.sync_weights(merge_and_sync=False)
        sampler.reset_prefix_cache()
        sampler_digests = sampler.weights_digest()
        if first_sync:
            model_digest = base_digest
            sampler_side = [d['base'] for d in sampler_digests]
        else:
            trainable = model.get_state_dict()
            model_digest = tensor_digest({lora_key(k): v for k, v in trainable.items()})
            sampler_side = [d['lora'] for d in sampler_digests]
        weights_match = all(d['sha256'] == model_digest['sha256'] for d in sampler_side)

        sample_responses = sampler.sample(expand_prompts, sampling_params)

        all_input_data: list[dict[str, Any]] = []
        all_old_logps: list[list[float]] = []
        all_completion_lengths: list[int] = []
        all_tokens: list[list[int]] = []
        for sample_response in sample_responses:
            for sequence in sample_response.sequences:
                all_input_data.append(sequence.new_input_feature)
                all_old_logps.append([logprob[0][1] for logprob in sequence.logprobs])
                all_completion_lengths.append(len(sequence.tokens))
                all_tokens.append(list(sequence.tokens))

        total_rewards, brevity_rewards, accuracy_rewards, digit_rewards = compute_rewards(all_input_data)
        metrics.accumulate(
            completion_lengths=all_completion_lengths,
            rewards={
                'total': total_rewards,
                'brevity': brevity_rewards,
                'accuracy': accuracy_rewards,
                'digits': digit_rewards,
            },
        )
        advantages = advantage_fn(total_rewards, num_generations=NUM_GENERATIONS, scale='group').tolist()

        losses = []
        total_completions = len(all_input_data)
        for mb_start in range(0, total_completions, MINI_BATCH_SIZE):
            mb_end = min(mb_start + MINI_BATCH_SIZE, total_completions)
            outputs = model.forward_backward(
                inputs=all_input_data[mb_start:mb_end],
                old_logps=all_old_logps[mb_start:mb_end],
                advantages=advantages[mb_start:mb_end],
                micro_batch_size=MICRO_BATCH_SIZE,
            )
            losses.append(outputs['loss'])
            model.clip_grad_and_step()
            optim_step += 1
            if optim_step >= max_steps:
                break
            if optim_step % SAVE_STEPS == 0:
                model.save(f'math-grpo-checkpoint-{optim_step}', output_dir=output_dir)

        log_dict = metrics.calculate()
        log_dict.update(model.calculate_metric(is_training=True))
        metrics.reset()
        logger.info(f'[Step {optim_step}/{max_steps}] {log_dict}')
        steps.append({
            'weights_match': weights_match,
            'model_weights': model_digest,
            'sampler_weights': sampler_side,
            'syncs': [d['syncs'] for d in sampler_digests],
            'tokens': all_tokens,
            'old_logps': all_old_logps,
            'rewards': total_rewards,
            'advantages': advantages,
            'losses': losses,
            'metrics': deterministic_metric(log_dict),
        })
        timing['metrics'].append({k: v for k, v in log_dict.items() if k not in deterministic_metric(log_dict)})
        timing['step_s'].append(time.perf_counter() - last)  # the batch's fetch included
        last = time.perf_counter()
        print(f'[grpo step {optim_step}] weights_match={weights_match} losses={losses} metrics={log_dict}',
              flush=True)

    logger.info(f'Training completed. optim_steps={optim_step}')
    saved = model.save('math-grpo-final', output_dir=output_dir)
    final = sorted(os.listdir(os.path.join(output_dir, 'math-grpo-final')))
    values = {'steps': steps, 'optim_steps': optim_step, 'saved': os.path.basename(str(saved)),
              'saved_files': final, 'placement': placement}
    result = write_result(args.out, 'grpo', args.backend, values, started, timing=timing)
    print(f'wrote {args.out} in {result["wall_s"]} s', flush=True)


if __name__ == '__main__':
    main()
