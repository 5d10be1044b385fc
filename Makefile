# Two commands do everything on a fresh clone: `make demo` and `make test`. Both are idempotent:
# the venv is created and packages installed only when missing or when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed
REF_VENV := .venv-ref
REF_STAMP := $(REF_VENV)/.installed
# The ref extra builds llama-cpp-python from its sdist (~20 minutes on 2 cores, once; pip caches the wheel);
# CMAKE_ARGS leaves out its multimodal library, which the GGUF tests do not use.

.PHONY: demo quality test test-slow test-ref lint format data bench clean chromium

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[test,plots,serve,gguf,tensorboard,hf,search]' -c constraints.txt
	touch $@

$(REF_STAMP): pyproject.toml constraints.txt
	test -x $(REF_VENV)/bin/python || $(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/python -c "import torch" 2>/dev/null || $(REF_VENV)/bin/python -m pip install --quiet $(TORCH_PIN)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(REF_VENV)/bin/python -m pip install --quiet -e '.[test,plots,ref]' -c constraints.txt
	touch $@

data: $(STAMP)
	$(PY) -m minillm.data

# The main job on the built-in corpus: pretrain -> generate -> SFT -> DPO -> reward model (and its gold judge, which
# no stage trains against) -> RLHF (PPO) -> a chat exchange -> the report card, model=tiny (times per CPU: docs/performance.md). resume=auto everywhere: a finished
# stage is not redone, an interrupted one continues.
DEMO_MODEL ?= tiny
# More train overrides for every stage of the demo, e.g. DEMO_ARGS=trainer.precision=32-true: the fp32 card on a CPU
# that would train in bf16-mixed (docs/log.md compares the two).
DEMO_ARGS ?=
DEMO_PROMPTS := 'prompt=["To be, or not to be", "In the beginning", "中共中央"]'
# The closing chat asks the first held-out question of each verifiable task (eval/verifiable.jsonl: no training file
# holds them, in any order) and a greeting no training file holds (tests/test_builtin.py checks both).
DEMO_CHAT := 'What is 52 + 5?\n/reset\nReverse the words: pencil butter silver ocean music\n/reset\nSort the words alphabetically: stone music rocket castle\n/reset\nHello, how are you?\n/exit\n'
# The card's pairs: dialogue relevance (no stage trains on it), the spoiled replies (the reward model's) and the
# verifiable answers (both); the card marks which a stage trained on. Its RL prompts: the held-out dialogue openers.
# Every held-out record (the largest family has 317), 64 rows a batch.
DEMO_EVAL := eval.limit=400 eval.batch_size=64 'eval.pairs=[chatterbot_pairs,chatterbot_spoiled,verifiable_pairs]' \
	eval.prompts=data/builtin/eval/chatterbot_pairs.jsonl
demo: data
	$(PY) -m minillm.train stage=pretrain model=$(DEMO_MODEL) experiment=demo resume=auto $(DEMO_ARGS)
	$(PY) -m minillm.generate model_path=outputs/pretrain_$(DEMO_MODEL)/final $(DEMO_PROMPTS) \
		max_new_tokens=48 temperature=0.8 top_p=0.9 repetition_penalty=1.1 seed=0
	$(PY) -m minillm.train stage=sft model=$(DEMO_MODEL) experiment=demo_sft resume=auto $(DEMO_ARGS)
	$(PY) -m minillm.pairs model_path=outputs/sft_$(DEMO_MODEL)/final limit=3000
	$(PY) -m minillm.train stage=dpo model=$(DEMO_MODEL) experiment=demo_dpo resume=auto $(DEMO_ARGS)
	$(PY) -m minillm.train stage=reward model=$(DEMO_MODEL) experiment=demo_reward resume=auto $(DEMO_ARGS)
	$(PY) -m minillm.train stage=reward model=$(DEMO_MODEL) experiment=demo_reward_gold resume=auto $(DEMO_ARGS)
	$(PY) -m minillm.train stage=rlhf model=$(DEMO_MODEL) experiment=demo_rlhf resume=auto $(DEMO_ARGS)
	printf $(DEMO_CHAT) | $(PY) -m minillm.chat model_path=outputs/rlhf_$(DEMO_MODEL)/final do_sample=false max_new_tokens=48
	$(PY) -m minillm.report model_name=$(DEMO_MODEL) $(DEMO_EVAL)

# The longer recipe (docs/performance.md): the same chain with longer budgets in outputs/quality/, then GRPO asking
# the rephrased questions (the verifiable tasks in words SFT never saw) for exact answers, and its own card,
# outputs/report_quality.md, against the quality targets.
QUALITY_RULE := stage.algorithm=grpo stage.reward=verifiable stage.ptx_coef=0 stage.temperature=1.0 \
	data.sources.rephrased.sample_ratio=1 +data.sources.chatterbot.sample_ratio=0 callbacks.task_eval.family=rephrased
# The card's pairs and PPO prompts, as in the demo (DEMO_EVAL).
QUALITY_EVAL := $(DEMO_EVAL)
# The two long stages train compiled (faster after about a minute of compiling: docs/performance.md).
quality: data
	$(PY) -m minillm.train stage=pretrain model=$(DEMO_MODEL) experiment=quality compile=true resume=auto
	$(PY) -m minillm.train stage=sft model=$(DEMO_MODEL) experiment=quality_sft compile=true resume=auto
	$(PY) -m minillm.pairs model_path=outputs/quality/sft_$(DEMO_MODEL)/final limit=3000 \
		out=data/builtin/preference/verifiable_onpolicy_quality.jsonl
	$(PY) -m minillm.train stage=dpo model=$(DEMO_MODEL) experiment=quality_dpo resume=auto
	$(PY) -m minillm.train stage=reward model=$(DEMO_MODEL) experiment=quality_reward resume=auto
	$(PY) -m minillm.train stage=rlhf model=$(DEMO_MODEL) experiment=quality_rlhf resume=auto
	$(PY) -m minillm.train stage=rlhf model=$(DEMO_MODEL) experiment=quality_rlhf $(QUALITY_RULE) resume=auto
	$(PY) -m minillm.report model_name=$(DEMO_MODEL) out_dir=outputs/quality card=outputs/report_quality.md \
		targets=quality 'stages=[pretrain,sft,dpo,reward,rlhf,rlhf-grpo]' grpo_family=rephrased $(QUALITY_EVAL)

LINTED := minillm conf tests benchmarks

test: $(STAMP)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m pytest -q

# Slow tests (CLI subprocesses, real corpus build, the chat page in headless Chromium) and reference parity tests
# (transformers/TRL in .venv-ref).
test-slow: $(STAMP) $(REF_STAMP) chromium
	$(PY) -m pytest -q -m slow
	$(REF_VENV)/bin/python -m pytest -q -m ref

# The browser test's Chromium and its driver: Debian's packages, installed when missing on a Linux machine where we
# are root and apt-get exists (tests/test_chat_page.py skips elsewhere, saying why).
chromium:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q chromium chromium-driver >/dev/null || \
				{ apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } || \
				echo "apt-get could not install chromium: the chat page test will be skipped"; \
		else echo "chromium/chromedriver missing and not installable here: the chat page test will be skipped"; fi; \
	fi

lint: $(STAMP)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)

format: $(STAMP)
	$(PY) -m ruff format $(LINTED)
	$(PY) -m ruff check --fix $(LINTED)

# Benchmarks (not tests): each prints a table and writes outputs/bench/<name>.json. Generation runs in .venv-ref
# so that transformers' generate is measured side by side on the same weights.
bench: data $(REF_STAMP)
	$(PY) -m benchmarks.train_throughput
	$(PY) -m benchmarks.plain_gpt
	$(REF_VENV)/bin/python -m benchmarks.generation
	$(PY) -m benchmarks.data
	$(PY) -m benchmarks.serve
	$(PY) -m benchmarks.startup
	$(PY) -m benchmarks.sampling
	$(PY) -m benchmarks.end_to_end

clean:
	rm -rf $(VENV) $(REF_VENV) *.egg-info .pytest_cache .ruff_cache
