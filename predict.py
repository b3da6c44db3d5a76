"""Cog predictor: chat with Llama-2-chat, or with the weights a training returned.

The inputs are those of Replicate's meta/llama-2-7b-chat versions. All logic is in src/.
"""

from cog import AsyncConcatenateIterator, BaseRunner, Input, concurrent, streaming

from src.serving.chat import ChatModel, build_chat_request
from src.serving.generation import GenerationStats
from src.serving.serving_plan import DEFAULT_SLOTS


class Predictor(BaseRunner):
    def setup(self, weights: str | None = None) -> None:
        # Cog passes COG_WEIGHTS through verbatim: a path, an http(s) URL or a data: URI.
        self.chat_model = ChatModel(str(weights) if weights else None)

    @streaming
    @concurrent(max=DEFAULT_SLOTS)  # Cog runs as many as COG_MAX_CONCURRENCY says
    async def run(
        self,
        prompt: str = Input(description="Prompt to send to the model."),
        system_prompt: str | None = Input(
            description="System prompt to send to the model. This is prepended to the prompt and helps guide system behavior. Left unset, the adapter is prompted as it was trained (with the system prompt its training rows used, or none if they used none); the plain base model, an adapter trained on text rows only and weights without that record get 'You are a helpful assistant.'. An empty string renders no <<SYS>> block.",
            default=None,
        ),
        max_new_tokens: int = Input(
            description="Maximum number of tokens to generate (capped to what fits in the context window). A word is generally 2-3 tokens.",
            default=128,
            ge=1,
        ),
        min_new_tokens: int = Input(
            description="Minimum number of tokens to generate. To disable, set to -1.",
            default=-1,
            ge=-1,
        ),
        temperature: float = Input(
            description="Adjusts randomness of outputs, greater than 1 is random and 0.01 is almost deterministic.",
            default=0.7,
            ge=0.01,
            le=5,
        ),
        top_p: float = Input(
            description="When decoding text, samples from the top p percentage of most likely tokens; lower to ignore less likely tokens.",
            default=0.95,
            ge=0.0,
            le=1.0,
        ),
        top_k: int = Input(
            description="When decoding text, samples from the top k most likely tokens; lower to ignore less likely tokens. To disable, set to -1.",
            default=-1,
            ge=-1,
        ),
        repetition_penalty: float = Input(
            description="A parameter that controls how repetitive text can be. Lower means more repetitive, while higher means less repetitive. Set to 1.0 (or 0) to disable.",
            default=1.15,
            ge=0.0,
        ),
        stop_sequences: str | None = Input(
            description="A comma-separated list of sequences to stop generation at. For example, '<end>,<stop>' will stop generation at the first instance of 'end' or '<stop>'. The stop sequence is not part of the output.",
            default=None,
        ),
        seed: int | None = Input(
            description="Random seed. Leave blank to randomize the seed. Any signed 64-bit integer.",
            default=None,
            ge=-9223372036854775808,
            le=9223372036854775807,
        ),
        debug: bool = Input(
            description="Log timings and token counts in the prediction's logs.",
            default=False,
        ),
        prompt_template: str = Input(
            description="Template for formatting the prompt. Can be an arbitrary string, but must contain the substring `{prompt}`; `{system_prompt}` is replaced by the system prompt.",
            default="[INST] <<SYS>>\n{system_prompt}\n<</SYS>>\n\n{prompt} [/INST]",
            min_length=1,
        ),
        replicate_weights: str | None = Input(
            description="Path or URL of the weights of another training of this model, to use for this request instead of the model's own.",
            default=None,
        ),
    ) -> AsyncConcatenateIterator[str]:
        inputs = {name: value for name, value in locals().items() if name != "self"}
        stats = GenerationStats()
        async for piece in self.chat_model.achat(build_chat_request(**inputs), stats):
            yield piece
        self.record_metric("input_token_count", stats.input_tokens)
        self.record_metric("output_token_count", stats.output_tokens)
        self.record_metric("time_to_first_token", stats.time_to_first_token)
        self.record_metric("tokens_per_second", stats.tokens_per_second)
