"""Text generation with GPTJModel's key/value cache: greedy, sampling and beam search.

    config.py       GenerationConfig (validated decoding settings)
    generator.py    Generator: prompts (token ids) -> Generation per prompt
    text.py         complete(): text prompts, stop strings, streaming
    predict.py      run.py --mode predict (prompts file, JSONL output); flags.py: its flags
    decode.py       greedy / sampling decoder; beam_search.py: beam search decoder
    processors.py   logit processors (pure functions); sampling.py: choosing a token
    batch.py        left padding and the cache slot layout
    greedy.py       greedy_generate(), the one-prompt call demo.py uses

See docs/generation.md. This package imports nothing on its own, so flags.py stays light.
"""
