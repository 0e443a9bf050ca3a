"""Tiny models, data and trainer builders for the tests (no network, CPU, seconds)."""

import torch
from torch import nn
from torch.utils.data import Dataset, SequentialSampler

from hf_sam import SAMTrainer, SAMTrainingArguments


class MLP(nn.Module):
    """x -> linear -> tanh (-> dropout) (-> batchnorm) -> linear; returns {"loss", "logits"} like HF models."""

    def __init__(self, d_in=6, d_hidden=12, n_classes=3, dropout=0.0, batchnorm=False, unused=False):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.drop = nn.Dropout(dropout)
        self.bn = nn.BatchNorm1d(d_hidden) if batchnorm else None
        self.head = nn.Linear(d_hidden, n_classes)
        self.unused = nn.Linear(2, 2) if unused else None  # trainable, never gets a gradient

    def forward(self, x, labels=None):
        h = self.drop(torch.tanh(self.fc1(x)))
        if self.bn is not None:
            h = self.bn(h)
        logits = self.head(h)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class Blobs(Dataset):
    def __init__(self, n=48, d_in=6, n_classes=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d_in, generator=g)
        self.y = torch.randint(0, n_classes, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class InOrderSAMTrainer(SAMTrainer):
    """SAMTrainer that reads the training set in order, so a reference can replay the batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                max_steps=3, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                max_grad_norm=0.0, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                dataloader_drop_last=True, seed=0, disable_tqdm=True)
    base.update(kw)
    return SAMTrainingArguments(**base)


def trainer(tmp_path, model=None, dataset=None, cls=InOrderSAMTrainer, sam_config=None, **kw):
    model = model if model is not None else MLP()
    dataset = dataset if dataset is not None else Blobs()
    return cls(model=model, args=args(tmp_path, **kw), train_dataset=dataset, sam_config=sam_config)


def params_copy(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def closure_steps(opt, model, windows):
    """Drive hf_sam.SAM over `windows`: `accumulate` a closure per micro-batch (loss / the window's
    length, as any accumulation loop does), then one `step()` and `zero_grad()` per window."""
    for window in windows:
        for mb in window:
            def closure(mb=mb):
                loss = model(**mb)["loss"] / len(window)
                loss.backward()
                return loss

            opt.accumulate(closure)
        opt.step()
        opt.zero_grad()


def windows(dataset, batch_size, ga, steps):
    """The micro-batches the in-order trainer sees: steps windows of ga micro-batches."""
    out, i = [], 0
    for _ in range(steps):
        window = []
        for _ in range(ga):
            idx = list(range(i, i + batch_size))
            i += batch_size
            if i > len(dataset):
                raise ValueError("dataset too small for the requested steps")
            items = [dataset[j] for j in idx]
            window.append({k: torch.stack([it[k] for it in items]) for k in items[0]})
        out.append(window)
    return out


# ---- tiny Hugging Face models of four families (built from configs, no download) ----------------
def gpt2(width=32, tie=False, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = dict(n_embd=width, n_layer=2, n_head=2, vocab_size=64, n_positions=16, tie_word_embeddings=tie,
               bos_token_id=0, eos_token_id=0)
    cfg.update(kw)
    return GPT2LMHeadModel(GPT2Config(**cfg))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, vocab_size=64, max_position_embeddings=16,
                                        tie_word_embeddings=False))


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=64, max_position_embeddings=16,
                                                    num_labels=3))


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, image_size=16, patch_size=8, num_labels=3))
