"""``sr-finetune plan``: a fine-tune run's memory per process, from configs on the meta device."""

from __future__ import annotations

import pytest

from sr_finetune.real_size import PUBLISHED_PARAMETERS
from sr_finetune.training.config import FinetuneConfig, LoraSettings
from sr_finetune.training.memory_plan import FORWARD, STEP, plan_memory


def _plan(model, **settings):
    return plan_memory(FinetuneConfig(model=str(model), **settings))


def test_plan_counts_the_parameters_of_the_real_model_from_its_hub_id():
    plan = _plan("stabilityai/stable-diffusion-2-1", train_text_encoder=False, gradient_checkpointing=True, train_batch_size=1)
    assert {name: total for name, (total, _) in plan.parameters.items()} == PUBLISHED_PARAMETERS
    assert {name: trained for name, (_, trained) in plan.parameters.items()} == {"unet": PUBLISHED_PARAMETERS["unet"], "text_encoder": 0, "vae": 0}
    assert plan.largest == "optimizer state (adamw, 8 B/param)"
    # the gradients of 866 M parameters outweigh one row's activations: the peak is at the step,
    # which runs after the backward has freed the activations
    held = sum(size for name, size in plan.items.items() if name not in plan.phases)
    assert plan.peak_phase == STEP and plan.peak == held + plan.items["gradients (fp32)"]
    assert plan.phase_bytes(FORWARD) == sum(size for name, size in plan.items.items() if name.startswith("activations")) > 0


def test_weights_gradients_and_optimizer_follow_the_trained_parameters(tiny_sd):
    plan = _plan(tiny_sd, mixed_precision="bf16")
    unet, text, vae = (plan.parameters[n][0] for n in ("unet", "text_encoder", "vae"))
    assert plan.items["weights unet"] == 4 * unet and plan.items["weights text_encoder"] == 4 * text
    assert plan.items["weights vae"] == 2 * vae  # frozen: in the mixed-precision dtype
    assert plan.items["gradients (fp32)"] == 4 * (unet + text)
    assert plan.items["optimizer state (adamw, 8 B/param)"] == 8 * (unet + text)
    eight_bit = _plan(tiny_sd, mixed_precision="bf16", optimizer="adamw8bit")
    assert eight_bit.items["optimizer state (adamw8bit, 2 B/param)"] == 2 * (unet + text)
    assert not any(k.startswith("EMA") for k in plan.items)
    assert _plan(tiny_sd, use_ema=True).items["EMA (fp32 copy of the trained parameters)"] == 4 * (unet + text)


def test_eight_bit_adamw_on_the_cpu_adds_its_step_temporaries_of_the_largest_trained_tensor(tiny_sd):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    text = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    step = "8-bit AdamW step on the CPU"
    on_cpu = plan_memory(FinetuneConfig(model=str(tiny_sd), optimizer="adamw8bit"), device="cpu")
    [(name, size)] = [(k, v) for k, v in on_cpu.items.items() if k.startswith(step)]
    assert size == 20 * max(p.numel() for module in (unet, text) for p in module.parameters())
    unet_only = plan_memory(FinetuneConfig(model=str(tiny_sd), optimizer="adamw8bit", train_text_encoder=False), device="cpu")
    assert sum(v for k, v in unet_only.items.items() if k.startswith(step)) == 20 * max(p.numel() for p in unet.parameters())
    # a GPU steps every tensor in one fused kernel; AdamW keeps no such item anywhere
    assert not any(k.startswith(step) for k in plan_memory(FinetuneConfig(model=str(tiny_sd), optimizer="adamw8bit"), device="cuda").items)
    assert not any(k.startswith(step) for k in plan_memory(FinetuneConfig(model=str(tiny_sd)), device="cpu").items)


def test_dpo_keeps_a_frozen_reference_copy_unless_lora(tiny_sd):
    plan = _plan(tiny_sd, objective="dpo", mixed_precision="fp16")
    unet, text = plan.parameters["unet"][0], plan.parameters["text_encoder"][0]
    assert plan.items["reference copy (frozen starting model)"] == 2 * (unet + text)
    lora = _plan(tiny_sd, objective="dpo", train_text_encoder=False, lora=LoraSettings(rank=4))
    assert lora.items["reference copy (frozen starting model)"] == 0


def test_lora_trains_exactly_the_adapter_parameters_peft_adds(tiny_sd):
    from diffusers import UNet2DConditionModel

    from sr_finetune.training.trainer import add_lora

    cfg = FinetuneConfig(model=str(tiny_sd), train_text_encoder=False, lora=LoraSettings(rank=4))
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    unet.requires_grad_(False)
    add_lora(unet, cfg)
    adapters = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert plan_memory(cfg).parameters["unet"][1] == adapters


def test_activation_estimate_grows_with_batch_and_shrinks_with_checkpointing(tiny_sd):
    def unet_activations(**settings):
        plan = _plan(tiny_sd, train_text_encoder=False, resolution=64, **settings)
        return next(v for k, v in plan.items.items() if k.startswith("activations unet"))

    one, two = unet_activations(train_batch_size=1), unet_activations(train_batch_size=2)
    assert 0 < one < two
    assert unet_activations(train_batch_size=2, gradient_checkpointing=True) < two
    assert unet_activations(train_batch_size=2, attention="eager") > two  # the attention matrix is kept


def _activations(plan) -> int:
    return sum(size for name, size in plan.items.items() if name.startswith("activations"))


def test_a_lora_run_at_a_large_batch_peaks_in_its_backward_not_at_its_step(tiny_sd):
    plan = _plan(tiny_sd, train_text_encoder=False, lora=LoraSettings(rank=4), train_batch_size=8, resolution=64)
    assert plan.peak_phase == FORWARD
    held = sum(size for name, size in plan.items.items() if name not in plan.phases)
    assert plan.peak == held + _activations(plan) and plan.phase_bytes(STEP) < _activations(plan)


def test_mixed_precision_is_traced_under_the_cpus_autocast_and_in_fp32_for_a_gpu(tiny_sd):
    settings = dict(train_text_encoder=False, train_batch_size=2, resolution=64, gradient_checkpointing=True)
    fp32 = _activations(plan_memory(FinetuneConfig(model=str(tiny_sd), **settings), device="cpu"))
    bf16 = plan_memory(FinetuneConfig(model=str(tiny_sd), mixed_precision="bf16", **settings), device="cpu")
    # convolutions and matmuls save their inputs in bf16: more than a quarter, less than the fp32 trace
    assert fp32 / 4 < _activations(bf16) < fp32
    assert bf16.items["autocast's half copies of the trained weights"] == 2 * bf16.parameters["unet"][1]
    on_gpu = plan_memory(FinetuneConfig(model=str(tiny_sd), mixed_precision="bf16", **settings), device="cuda")
    assert _activations(on_gpu) == fp32 and any("traced in fp32" in note for note in on_gpu.notes)


def test_lora_traces_only_what_the_adapted_layers_save(tiny_sd):
    settings = dict(train_text_encoder=False, train_batch_size=2, resolution=64)
    full, lora = _activations(_plan(tiny_sd, **settings)), _activations(_plan(tiny_sd, lora=LoraSettings(rank=4), **settings))
    assert 0 < lora < full


def test_cli_prints_the_plan_with_the_cards_it_fits(tiny_sd, capsys):
    from sr_finetune.commands.cli import main

    assert main(["plan", f"model={tiny_sd}"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak" in out and "fits: 24 GB yes, 40 GB yes, 80 GB yes" in out
    assert "memory, held throughout:" in out and "memory, optimizer step:" in out
    # planned for a GPU from this machine: 8-bit AdamW's CPU step temporaries are left out
    assert main(["plan", "--device", "cuda", f"model={tiny_sd}", "optimizer=adamw8bit"]) == 0
    on_gpu = capsys.readouterr().out
    assert "8-bit AdamW step on the CPU" not in on_gpu
    assert main(["plan", "--device", "cpu", f"model={tiny_sd}", "optimizer=adamw8bit"]) == 0
    assert "8-bit AdamW step on the CPU" in capsys.readouterr().out
    assert "activations are an estimate" in out


def test_cli_refuses_a_model_whose_architecture_it_cannot_know_in_one_line(capsys):
    from sr_finetune.commands.cli import main

    assert main(["plan", "model=someone/some-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no architecture known for model 'someone/some-model'" in err[0]


@pytest.mark.parametrize("objective", ["backprop"])
def test_online_objectives_say_their_activations_are_not_estimated(tiny_sd, objective):
    plan = _plan(tiny_sd, objective=objective)
    assert not any(k.startswith("activations") for k in plan.items)
    assert any("not estimated" in note for note in plan.notes)
