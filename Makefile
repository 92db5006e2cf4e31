# The two commands a new user runs: `make demo` and `make test`. Both set up .venv themselves.
PYTHON_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python

# ---- The demo's settings, all in one place --------------------------------------------------------
# A small, fast model for the synthetic shapes set on a CPU: a ResNet-18 cut after its second block,
# trained from scratch at 64x64 (an 8x8 attention grid). train.py's own defaults are the paper's
# COCO setup (ResNet-101, 14x14 grid, 512/512/512).
DEMO_DIR ?= runs/demo
DEMO_IMAGES ?= 3000
DEMO_SEED ?= 0
DEMO_IMAGE_SIZE ?= 64
DEMO_MODEL ?= --encoder-arch resnet18 --encoder-cut-after layer2 --encoded-size 8 --no-pretrained \
	--fine-tune-encoder --attention-dim 256 --embed-dim 128 --decoder-dim 256 --dropout 0.3
# Cross-entropy first. --precise-bn-batches: validation and best.pt get BatchNorm statistics that fit the
# weights (the moving averages lag a from-scratch encoder at this learning rate: docs/demo.md).
# --alpha-c 0: no doubly stochastic penalty, which asks each of the 64 cells for a total attention of 1
# over captions of about 8 words, so spreads attention (content 0.76 -> 0.83 without it: docs/demo.md).
DEMO_OPTIM ?= --epochs 4 --batch-size 32 --encoder-lr 1e-3 --decoder-lr 1e-3 --lr-decay-patience 1 --lr-decay-factor 0.5 \
	--val-beam-size 1 --precise-bn-batches 100 --alpha-c 0
# Then self-critical training from the cross-entropy best.pt: 10 epochs of 40 steps (16 images, 5 samples
# each; one attention figure an epoch for TensorBoard), about the time of 1.5 cross-entropy epochs, after
# which the model names and grounds objects far better (docs/demo.md). Each sample is rewarded against
# the reference it matches best and compared with the image's other samples, and 0.12 of the references'
# own loss stays in the objective: the model does not settle on one phrasing (every object's size, as
# CIDEr-D against all five references pays for), so its loss on the references rises under 10% an epoch.
DEMO_SCST ?= --batch-size 16 --steps-per-epoch 40 --epochs 10 --decoder-lr 1e-4 --workers 0 --log-images 1 \
	--reward-against closest --scst-baseline mean --xe-weight 0.12
DEMO_BEST := $(DEMO_DIR)/scst/best.pt
DEMO_WORKERS ?= 1
# A point of the training curves every 10 steps (the default 50 suits COCO's ~13,000 steps an epoch).
DEMO_LOG ?= --log-every 10
DEMO_BEAM ?= 3

# The demo's self-critical stage run longer (make demo first): from its cross-entropy best.pt, 30 epochs
# of 40 steps instead of 10 (docs/self-critical.md).
SCST_DIR ?= runs/demo-scst
SCST_OPTIM ?= $(DEMO_SCST) --epochs 30

.PHONY: demo demo-scst test test-app mutants install clean-demo app app-install help

install: $(VENV)/.installed  ## create .venv with requirements.txt (make demo and make test do it too)

$(VENV)/.installed: requirements.txt
	$(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# The web page's extra requirements (Gradio; Playwright for its browser test) go into a venv of their own,
# layered on .venv (a .pth file puts .venv's packages on its path): Gradio 6 asks for Pillow < 13, which
# installed into .venv would replace the Pillow that the packing tests decode with. `make demo` and
# `make test` do not grow; `make test` skips the page's tests, which `make test-app` runs.
APP_VENV := .venv-app
APP_PY := $(APP_VENV)/bin/python

app-install: $(APP_VENV)/.installed  ## create .venv-app with the web page's requirements (Gradio, Playwright)

$(APP_VENV)/.installed: $(VENV)/.installed requirements-app.txt
	$(PYTHON_SYS) -m venv $(APP_VENV)
	$(PY) -c "import site; print(site.getsitepackages()[0])" \
		> "$$($(APP_PY) -c 'import site; print(site.getsitepackages()[0])')/project-venv.pth"
	$(APP_PY) -m pip install --quiet -r requirements-app.txt
	touch $@

# Only the tests that serve the page: the rest of tests/test_app.py needs no Gradio and runs in `make test`.
test-app: $(APP_VENV)/.installed  ## run the tests that serve the web page (needs make app-install)
	$(APP_PY) -m pytest -q -m page tests/test_app.py

# The web page for the demo model (after `make demo`): open the address it prints.
app: $(APP_VENV)/.installed  ## serve the web page for the demo model (after make demo)
	$(APP_PY) app.py --checkpoint $(DEMO_BEST) --data-folder $(DEMO_DIR)/data

# One test process per core (pytest-xdist), each test file whole in one of them: most tests run one
# thread (conftest.py), so a second process uses the second core (docs/testing.md).
test: $(VENV)/.installed  ## run the test suite, offline on the CPU
	$(PY) -m pytest -q -n auto --dist loadfile tests

# Realistic bugs put into a scratch copy one at a time: each must make a test fail (tests/mutants.py).
mutants: $(VENV)/.installed  ## put realistic bugs in one at a time; each must make a test fail
	$(PY) tests/mutants.py

demo: $(VENV)/.installed  ## make shapes data, pack, train, evaluate, caption: about 15 min on 2 CPU cores
	$(PY) make_shapes_dataset.py --output-folder $(DEMO_DIR)/shapes --num-images $(DEMO_IMAGES) --seed $(DEMO_SEED)
	$(PY) create_input_files.py --dataset shapes --karpathy-json $(DEMO_DIR)/shapes/dataset_shapes.json \
		--image-folder $(DEMO_DIR)/shapes --output-folder $(DEMO_DIR)/data --image-size $(DEMO_IMAGE_SIZE) \
		--workers 2
	$(PY) train.py --data-folder $(DEMO_DIR)/data --output-dir $(DEMO_DIR)/train --workers $(DEMO_WORKERS) \
		--seed $(DEMO_SEED) $(DEMO_MODEL) $(DEMO_OPTIM) $(DEMO_LOG)
	$(PY) scst.py --checkpoint $(DEMO_DIR)/train/best.pt --data-folder $(DEMO_DIR)/data \
		--output-dir $(DEMO_DIR)/scst --seed $(DEMO_SEED) $(DEMO_SCST) $(DEMO_LOG)
	$(PY) eval.py --checkpoint $(DEMO_BEST) --data-folder $(DEMO_DIR)/data --split test \
		--beam-size $(DEMO_BEAM) --workers 0
	$(PY) caption.py --img $$($(PY) -c "import json; print(json.load(open('$(DEMO_DIR)/data/test_meta.json'))['images'][0]['file'])") \
		--checkpoint $(DEMO_BEST) --data-folder $(DEMO_DIR)/data \
		--beam-size $(DEMO_BEAM) --out $(DEMO_DIR)/attention.png
	@$(PY) -c "import json; m = json.load(open('$(DEMO_DIR)/scst/metrics_test_beam$(DEMO_BEAM).json')); \
		print(f\"demo: test BLEU-4 {m['bleu4']:.4f}, content accuracy {m['content_accuracy']:.3f} (beam $(DEMO_BEAM)); attention figure: $(DEMO_DIR)/attention.png\")"
	@echo "demo: training curves: $(DEMO_DIR)/train/curves.png, then $(DEMO_DIR)/scst/curves.png (tensorboard --logdir $(DEMO_DIR))"

demo-scst: $(VENV)/.installed  ## the demo's self-critical stage, 3x longer, then evaluate (after make demo)
	$(PY) scst.py --checkpoint $(DEMO_DIR)/train/best.pt --data-folder $(DEMO_DIR)/data \
		--output-dir $(SCST_DIR) --seed $(DEMO_SEED) $(SCST_OPTIM)
	$(PY) eval.py --checkpoint $(SCST_DIR)/best.pt --data-folder $(DEMO_DIR)/data --split test \
		--beam-size $(DEMO_BEAM) --workers 0

clean-demo:  ## delete runs/demo
	rm -rf $(DEMO_DIR)

# `make help` prints each target with the text after its `##`.
help:  ## list the targets, one line each
	@awk -F':.*## ' '/^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
