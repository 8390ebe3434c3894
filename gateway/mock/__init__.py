"""The mock upstream (gateway mock-upstream): OpenAI/Anthropic answers, SSE, capacity, knobs."""
