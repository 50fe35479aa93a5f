# The user's verbs. Each target installs what it needs into .venv first (torch pinned, then the project),
# so a fresh clone on a machine with only python3 works: `make pretrain`, `make test`.
PYTHON        ?= python3
TORCH_VERSION ?= 2.13.0
VENV          ?= .venv
BIN           := $(VENV)/bin
STAMP         := $(VENV)/.installed-$(TORCH_VERSION)
RUNS          ?= runs
ARGS          ?=

.PHONY: install pretrain finetune cifar10-data cifar10 test bench tensorboard data clean

install: $(STAMP)

# torch is installed first and pinned: an unpinned torch pulls the CUDA build (several GB) on a CPU machine.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

## The default experiment: builds the synthetic shapes corpus if absent, trains a small ViT, logs to $(RUNS)/.
pretrain: install
	$(BIN)/vitx fit --config conf/vit/pretrain.yaml $(ARGS)

## Fine-tune the newest pretrain checkpoint at 48 px (position embedding resampled, new zero-initialised head).
PRETRAINED ?= $(shell ls -t runs/vit-pretrain/version_*/checkpoints/last.ckpt 2>/dev/null | head -1)
finetune: install
	@test -n "$(PRETRAINED)" || { echo "no runs/vit-pretrain/*/checkpoints/last.ckpt: run 'make pretrain' first, or pass PRETRAINED=path.ckpt"; exit 2; }
	$(BIN)/vitx fit --config conf/vit/finetune.yaml --model.init_from $(PRETRAINED) $(ARGS)

## CIFAR-10 from ../shared/data/cifar10 (or CIFAR10_SRC=...) to shards, then a ViT on it.
CIFAR10_SRC ?= ../shared/data/cifar10/cifar10-jpg.tar.gz
cifar10-data: install
	test -f data/cifar10/sizes.json || $(BIN)/vitx data from-folder $(CIFAR10_SRC) data/cifar10
cifar10: cifar10-data
	$(BIN)/vitx fit --config conf/vit/cifar10.yaml $(ARGS)

## DeiT: train the demo ResNet teacher if there is none yet (conf/cnn/teacher-shapes.yaml), then distil a small ViT
## from the newest one (conf/deit/distill-shapes.yaml). TEACHER=path.ckpt distils from another vitx classifier.
.PHONY: teacher distill
TEACHER      ?=
TEACHER_CKPTS := $(RUNS)/cnn-teacher-shapes/version_*/checkpoints/last.ckpt
teacher: install
	@test -n "$(TEACHER)" || ls $(TEACHER_CKPTS) >/dev/null 2>&1 || \
		$(BIN)/vitx fit --config conf/cnn/teacher-shapes.yaml --trainer.logger.init_args.save_dir $(RUNS)
distill: teacher
	$(BIN)/vitx fit --config conf/deit/distill-shapes.yaml --trainer.logger.init_args.save_dir $(RUNS) \
		--model.teacher_ckpt "$(or $(TEACHER),$$(ls -t $(TEACHER_CKPTS) | head -1))" $(ARGS)

## DeiT's experiment on CIFAR-10: the ResNet teacher (skipped when one exists), then one student distilled from it
## and the same student without a teacher (same data, steps and seed). Compare val/acc1 in TensorBoard.
.PHONY: deit-cifar10
CIFAR_TEACHER_CKPTS := $(RUNS)/cnn-teacher-cifar10/version_*/checkpoints/last.ckpt
deit-cifar10: cifar10-data
	ls $(CIFAR_TEACHER_CKPTS) >/dev/null 2>&1 || \
		$(BIN)/vitx fit --config conf/cnn/teacher-cifar10.yaml --trainer.logger.init_args.save_dir $(RUNS)
	$(BIN)/vitx fit --config conf/deit/distill-cifar10.yaml --trainer.logger.init_args.save_dir $(RUNS) \
		--model.teacher_ckpt "$$(ls -t $(CIFAR_TEACHER_CKPTS) | head -1)" $(ARGS)
	$(BIN)/vitx fit --config conf/deit/distill-cifar10.yaml --trainer.logger.init_args.save_dir $(RUNS) \
		--trainer.logger.init_args.name deit-cifar10-no-teacher --model.distillation none $(ARGS)

## CLIP: write the captioned shapes corpus and train its caption tokenizer if absent, then contrastive pretraining
## on the CPU (at most 10 minutes of training); zero-shot accuracy and retrieval recall land in TensorBoard.
.PHONY: clip
CLIP_DATA ?= data/shapes-captions
clip: install
	test -f $(CLIP_DATA)/sizes.json || $(BIN)/vitx data synth-captions $(CLIP_DATA)
	test -f $(CLIP_DATA)/tokenizer.json || $(BIN)/vitx data train-tokenizer '$(CLIP_DATA)/train-{000000..000019}.tar' \
		$(CLIP_DATA)/tokenizer.json --vocab-size 1024 --context-length 24
	$(BIN)/vitx fit --config conf/clip/demo.yaml --trainer.accelerator cpu $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

bench: install
	$(BIN)/python -m benchmarks $(ARGS)

tensorboard: install
	$(BIN)/tensorboard --logdir $(RUNS) --bind_all

## TensorBoard as a user sees it: a short run of conf/vit/pretrain.yaml, every expected tag checked through
## TensorBoard's HTTP API, headless-Chromium screenshots of each tab in runs/dashboard-check/screenshots/.
.PHONY: dashboard-check
dashboard-check: install
	$(BIN)/python tools/dashboard_check.py $(ARGS)

## Write the synthetic demo corpus by hand (pretrain does this itself when it is missing).
data: install
	$(BIN)/vitx data synth data/shapes

clean:
	rm -rf $(RUNS) data/shapes
