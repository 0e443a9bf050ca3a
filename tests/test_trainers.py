"""SAM on other host trainers: TRL's SFTTrainer and DPOTrainer, Seq2SeqTrainer, and hyperparameter search.

Every check compares with an independent reference: the stock host trainer (rho 0, the clean pass's
metrics) or a plain-torch SAM step written here from the paper's equations:
    g = grad L(w);  e = rho * g / ||g||;  w <- w - lr * grad L(w + e)      (SGD, constant lr)
Tiny models built from configs and a BPE tokenizer trained here on a few sentences: no download.
"""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import tiny

from hf_sam import SAMConfig, SAMMixin, SAMTrainer, with_sam, with_sam_args
from hf_sam.variants import register, unregister

trl = pytest.importorskip("trl")
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "the bird sang a song", "python is a language",
             "sam seeks flat minima", "the sun rose over the hill", "we train tiny models", "tokens are counted"]
# no shuffling, dropout, clipping, weight decay or schedule: a step is w <- w - lr * g
PLAIN = dict(report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
             optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0)
TRL_PLAIN = dict(PLAIN, bf16=False, activation_checkpointing=False)


@functools.lru_cache(maxsize=1)
def tokenizer():
    """A 60-token BPE trained on SENTENCES (offline), wrapped as a fast tokenizer with eos = pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=60, special_tokens=["<eos>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer()), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0))


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


def step_logs(trainer):
    return [e for e in trainer.state.log_history if "loss" in e]


def sam_reference_step(model, loss_fn, rho, lr):
    """One plain-torch SAM step with SGD: w <- w - lr * grad L(w + rho g/||g||), g = grad L(w)."""
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(loss_fn(model), params)
    norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g)).float()
    e = [rho * x / (norm + 1e-12) for x in g]
    with torch.no_grad():
        for p, d in zip(params, e):
            p.add_(d)
    g_adv = torch.autograd.grad(loss_fn(model), params)
    with torch.no_grad():
        for p, d, ga in zip(params, e, g_adv):
            p.sub_(d).sub_(lr * ga)


# ================================================================================================
# TRL SFTTrainer
def sft_data():
    from datasets import Dataset as HFDataset

    return HFDataset.from_dict({"text": SENTENCES})


def sft_args(cls=SFTConfig, tmp_path=None, **kw):
    base = dict(TRL_PLAIN, output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=0.5,
                max_length=32)
    base.update(kw)
    return cls(**base)


def run_sft(cls, tmp_path, args=None, **kw):
    model = gpt2()
    trainer = cls(model=model, args=args if args is not None else sft_args(tmp_path=tmp_path), train_dataset=sft_data(),
                  processing_class=tokenizer(), **kw)
    trainer.train()
    return model, trainer


class MixinFirstSFT(SAMMixin, SFTTrainer):
    pass


class SAMTrainerFirstSFT(SAMTrainer, SFTTrainer):
    pass


class HostFirstSFT(SFTTrainer, SAMTrainer):
    pass


SFT_ORDERS = {"with_sam": with_sam(SFTTrainer), "SAMMixin,SFTTrainer": MixinFirstSFT,
              "SAMTrainer,SFTTrainer": SAMTrainerFirstSFT, "SFTTrainer,SAMTrainer": HostFirstSFT}


@pytest.fixture(scope="module")
def stock_sft(tmp_path_factory):
    return run_sft(SFTTrainer, tmp_path_factory.mktemp("stock_sft"))


@pytest.fixture(scope="module")
def sam_sft(tmp_path_factory):
    return run_sft(with_sam(SFTTrainer), tmp_path_factory.mktemp("sam_sft"), sam_config=SAMConfig(rho=0.05))


def test_sft_rho0_equals_stock(tmp_path, stock_sft):
    stock_model, stock = stock_sft
    model, trainer = run_sft(with_sam(SFTTrainer), tmp_path, sam_config=SAMConfig(rho=0.0))
    assert max_diff(model, stock_model) <= 1e-7
    assert [e["loss"] for e in step_logs(trainer)] == [e["loss"] for e in step_logs(stock)]


@pytest.mark.parametrize("order", list(SFT_ORDERS))
def test_sft_sam_logs_rho_and_clean_pass_metrics(tmp_path, stock_sft, sam_sft, order):
    """Perturbation norm = rho; SFT's token count and first-step accuracy/entropy/loss are the stock trainer's."""
    stock_model, stock = stock_sft
    model, trainer = run_sft(SFT_ORDERS[order], tmp_path, sam_config=SAMConfig(rho=0.05))
    assert max_diff(model, sam_sft[0]) == 0.0  # every class order trains the same weights
    logs, stock_logs = step_logs(trainer), step_logs(stock)
    assert len(logs) == 3
    for e in logs:
        assert e["sam/perturbation_norm"] == pytest.approx(0.05, rel=1e-5)
    # tokens do not depend on the weights: the counter must not count the perturbed pass
    assert [e["num_tokens"] for e in logs] == [e["num_tokens"] for e in stock_logs] != [0, 0, 0]
    # the first step's clean pass runs at the same w as the stock trainer's only pass
    for key in ("loss", "mean_token_accuracy", "entropy"):
        assert logs[0][key] == stock_logs[0][key], key
    assert max_diff(model, stock_model) > 1e-4  # and SAM did change the update
    assert all(len(v) == 0 for v in trainer._metrics["train"].values())  # TRL's lists: cleared at every log


def test_sft_gradient_accumulation_metrics_are_the_clean_passes(tmp_path):
    """GA 2: every clean pass of the first step is at w, so its averaged metrics equal the stock trainer's."""
    args = dict(tmp_path=tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2)
    _, stock = run_sft(SFTTrainer, tmp_path, args=sft_args(**args))
    _, trainer = run_sft(with_sam(SFTTrainer), tmp_path, args=sft_args(**args), sam_config=SAMConfig(rho=0.05))
    logs, stock_logs = step_logs(trainer), step_logs(stock)
    assert [e["num_tokens"] for e in logs] == [e["num_tokens"] for e in stock_logs]
    for key in ("loss", "mean_token_accuracy", "entropy"):
        assert logs[0][key] == pytest.approx(stock_logs[0][key], rel=1e-6, abs=0), key
    assert logs[0]["sam/perturbation_norm"] == pytest.approx(0.05, rel=1e-5)


def test_sft_config_with_sam_args_equals_sam_config(tmp_path):
    from trl import TrlParser

    SAMSFTConfig = with_sam_args(SFTConfig)
    args = sft_args(SAMSFTConfig, tmp_path, sam_rho=0.1, sam_variant="asam")
    assert args.sam_config == SAMConfig(rho=0.1, variant="asam") and args.max_length == 32
    model_a, trainer_a = run_sft(with_sam(SFTTrainer), tmp_path, args=args)
    model_b, trainer_b = run_sft(with_sam(SFTTrainer), tmp_path, sam_config=SAMConfig(rho=0.1, variant="asam"))
    assert max_diff(model_a, model_b) == 0.0
    assert step_logs(trainer_a)[-1]["sam/perturbation_norm"] == step_logs(trainer_b)[-1]["sam/perturbation_norm"]

    # TRL's own parser sees the sam_* fields next to SFTConfig's
    (parsed,) = TrlParser([SAMSFTConfig]).parse_args_and_config(
        ["--output_dir", str(tmp_path), "--bf16", "false", "--sam_rho", "0.2", "--sam_variant", "gsam",
         "--max_length", "64"])
    assert parsed.sam_config.rho == 0.2 and parsed.sam_config.variant == "gsam" and parsed.max_length == 64
    with pytest.raises(ValueError, match="rho=-1"):
        sft_args(SAMSFTConfig, tmp_path, sam_rho=-1.0)


def test_host_first_order_refuses_variants_that_wrap_the_loss(tmp_path):
    """SFTTrainer.compute_loss does not call super(): with SFTTrainer before SAMMixin a loss hook cannot run."""
    calls = []

    def loss_wrapping(ctx):
        def hook(compute, model, inputs, n):
            calls.append(1)
            return compute(inputs)

        ctx.grad(final=True, loss_hook=hook)

    register("loss_hook_test", passes=1, uses_rho=False, replace=True)(loss_wrapping)
    try:
        with pytest.raises(ValueError, match="Put SAMMixin first"):
            run_sft(HostFirstSFT, tmp_path, sam_config=SAMConfig(variant="loss_hook_test"))
        assert calls == []
        run_sft(MixinFirstSFT, tmp_path, sam_config=SAMConfig(variant="loss_hook_test"))
        assert len(calls) == 3  # one wrapped loss per step
    finally:
        unregister("loss_hook_test")


# ================================================================================================
# TRL DPOTrainer
DPO_DATA = {"prompt": ["the cat", "a dog", "the bird", "python is"],
            "chosen": [" sat on the mat", " ran in the park", " sang a song", " a language"],
            "rejected": [" ran in", " sang", " is a mat", " the hill sun"]}


def dpo_loss(model, ref_model, batch, beta):
    """DPO's sigmoid loss, summed completion log-probs; the batch is [chosen..., rejected...]."""
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"][:, 1:]

    def seq_logps(m):
        logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        token_logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (token_logps * completion).sum(1)

    pi_c, pi_r = seq_logps(model).chunk(2)
    with torch.no_grad():
        ref_c, ref_r = seq_logps(ref_model).chunk(2)
    loss = -F.logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).mean()
    return loss, {"rewards/chosen": (beta * (pi_c - ref_c)).mean().item(),
                  "rewards/rejected": (beta * (pi_r - ref_r)).mean().item(),
                  "logps/chosen": pi_c.mean().item(), "logps/rejected": pi_r.mean().item()}


@pytest.mark.parametrize("order", ["with_sam", "DPOTrainer,SAMTrainer"])
def test_dpo_sam_equals_plain_torch_reference(tmp_path, order):
    from datasets import Dataset as HFDataset

    beta, rho, lr, steps = 0.5, 0.1, 0.5, 2
    model = gpt2()
    init = copy.deepcopy(model)
    batches = []
    bases = (with_sam(DPOTrainer),) if order == "with_sam" else (DPOTrainer, SAMTrainer)

    class RecordingDPO(*bases):
        def training_step(self, model, inputs, *args, **kwargs):
            batches.append({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)})
            return super().training_step(model, inputs, *args, **kwargs)

    args = DPOConfig(**TRL_PLAIN, output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps,
                     learning_rate=lr, beta=beta)
    trainer = RecordingDPO(model=model, ref_model=copy.deepcopy(init), args=args,
                           train_dataset=HFDataset.from_dict(DPO_DATA), processing_class=tokenizer(),
                           sam_config=SAMConfig(rho=rho))
    trainer.train()
    assert len(batches) == steps

    ref_model, frozen = copy.deepcopy(init), copy.deepcopy(init)
    logs = step_logs(trainer)
    for batch, logged in zip(batches, logs):
        _, clean_metrics = dpo_loss(ref_model, frozen, batch, beta)  # the clean pass at w
        for key, value in clean_metrics.items():  # logged once, with the clean pass's value
            assert logged[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        assert logged["sam/perturbation_norm"] == pytest.approx(rho, rel=1e-5)
        sam_reference_step(ref_model, lambda m: dpo_loss(m, frozen, batch, beta)[0], rho, lr)
    assert max_diff(model, ref_model) <= 1e-5
    assert logs[1]["rewards/chosen"] != 0.0  # the second step sees a policy that moved away from the reference


# ================================================================================================
# Seq2SeqTrainer (tiny T5 and Bart)
class Pairs(Dataset):
    def __init__(self, n=8, src=6, tgt=5, vocab=32):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(3, vocab, (n, src), generator=g)
        self.y = torch.randint(3, vocab, (n, tgt), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.y[i]}


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_decoder_layers=1, num_heads=2, dropout_rate=0.0,
                                               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                                                   dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                                   pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                   decoder_start_token_id=2, forced_eos_token_id=None))


def _seq2seq_orders():
    from transformers import Seq2SeqTrainer

    class HostFirst(Seq2SeqTrainer, SAMTrainer):
        pass

    return {"with_sam": with_sam(Seq2SeqTrainer), "Seq2SeqTrainer,SAMTrainer": HostFirst}


@pytest.mark.parametrize("order", ["with_sam", "Seq2SeqTrainer,SAMTrainer"])
@pytest.mark.parametrize("build", [t5, bart], ids=["t5", "bart"])
def test_seq2seq_sam_equals_plain_torch_reference(tmp_path, build, order):
    from transformers import Seq2SeqTrainingArguments

    rho, lr = 0.1, 0.5
    data = Pairs()
    model = build()
    reference = copy.deepcopy(model)
    args = Seq2SeqTrainingArguments(**PLAIN, output_dir=str(tmp_path), per_device_train_batch_size=len(data),
                                    max_steps=1, learning_rate=lr)
    trainer = _seq2seq_orders()[order](model=model, args=args, train_dataset=data, sam_config=SAMConfig(rho=rho))
    assert trainer.sam_config.rho == rho
    trainer.train()
    assert step_logs(trainer)[0]["sam/perturbation_norm"] == pytest.approx(rho, rel=1e-5)

    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in data[0]}
    reference.train()
    sam_reference_step(reference, lambda m: m(**batch).loss, rho, lr)
    assert max_diff(model, reference) <= 1e-6
    assert max_diff(model, build()) > 1e-3


def test_seq2seq_arguments_with_sam_fields(tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    args = with_sam_args(Seq2SeqTrainingArguments)(**PLAIN, output_dir=str(tmp_path), per_device_train_batch_size=8,
                                                   max_steps=1, learning_rate=0.5, sam_rho=0.1,
                                                   predict_with_generate=True)
    trainer = with_sam(Seq2SeqTrainer)(model=t5(), args=args, train_dataset=Pairs())
    trainer.train()
    assert step_logs(trainer)[0]["sam/perturbation_norm"] == pytest.approx(0.1, rel=1e-5)


# ================================================================================================
# hyperparameter_search (optuna) and model_init
def model_init(trial=None):
    torch.manual_seed(0)
    return tiny.MLP()


def quiet_optuna():
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def hp_trainer(tmp_path, **kw):
    from transformers import TrainerCallback, TrainingArguments

    norms = []

    class Norms(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            norms.append([])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "sam/perturbation_norm" in logs:
                norms[-1].append(logs["sam/perturbation_norm"])

    args = TrainingArguments(**PLAIN, output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4,
                             learning_rate=0.1, eval_strategy="no")
    trainer = SAMTrainer(model_init=model_init, args=args, train_dataset=tiny.Blobs(n=32),
                         eval_dataset=tiny.Blobs(n=32, seed=1), callbacks=[Norms()], **kw)
    return trainer, norms


def test_optuna_trials_apply_sam_rho(tmp_path):
    optuna = quiet_optuna()
    trainer, norms = hp_trainer(tmp_path)
    picked = {}

    def space(trial):
        picked[trial.number] = trial.suggest_categorical("sam_rho", [0.2, 0.01])
        return {"sam_rho": picked[trial.number]}

    trainer.hyperparameter_search(hp_space=space, backend="optuna", n_trials=2, direction="minimize",
                                  sampler=optuna.samplers.GridSampler({"sam_rho": [0.2, 0.01]}, seed=0))
    assert sorted(picked.values()) == [0.01, 0.2] and len(norms) == 2
    for number, rho in picked.items():  # trials run in order, one train() each
        assert len(norms[number]) == 4
        assert norms[number] == pytest.approx([rho] * 4, rel=1e-5)


def test_optuna_fsam_trials_start_fresh(tmp_path):
    quiet_optuna()
    trainer, _ = hp_trainer(tmp_path)
    eval_losses = []

    def objective(metrics):
        eval_losses.append(metrics["eval_loss"])
        return metrics["eval_loss"]

    def space(trial):
        return {"sam_variant": trial.suggest_categorical("sam_variant", ["fsam"]),
                "sam_fsam_sigma": trial.suggest_categorical("sam_fsam_sigma", [1.0])}

    trainer.hyperparameter_search(hp_space=space, backend="optuna", n_trials=2, direction="minimize",
                                  compute_objective=objective)
    assert trainer.sam_state, "F-SAM keeps a gradient average in the variant state"
    # the same run outside the search (a fresh trainer) gives the same eval loss as each trial
    alone, _ = hp_trainer(tmp_path / "alone", sam_config=SAMConfig(variant="fsam", fsam_sigma=1.0))
    alone.train()
    assert eval_losses == [alone.evaluate()["eval_loss"]] * 2

    # and a second train() call of the same trainer starts fresh too
    alone.train()
    assert alone.evaluate()["eval_loss"] == eval_losses[0]


def test_generated_argument_classes_pickle(tmp_path):
    """The Trainer saves `torch.save(self.args)` in every checkpoint: with_sam_args classes must pickle."""
    import pickle

    from transformers import Seq2SeqTrainingArguments

    for cls, extra in ((with_sam_args(SFTConfig), dict(bf16=False)), (with_sam_args(Seq2SeqTrainingArguments), {})):
        args = cls(output_dir=str(tmp_path), use_cpu=True, report_to=[], sam_rho=0.3, **extra)
        back = pickle.loads(pickle.dumps(args))
        assert type(back) is cls and back.sam_config == SAMConfig(rho=0.3)
