"""An outside agent framework against `lmforge serve`: smolagents' tool-calling agent drives
SmolLM2-135M through the OpenAI-compatible API, and every turn comes back as a tool call it parses."""

from __future__ import annotations

import pytest

smolagents = pytest.importorskip("smolagents")


def test_smolagents_tool_calling_agent_runs_on_lmforge_serve(start_server):
    from lmforge.api import load
    from lmforge.serve.served_model import ServedModel

    @smolagents.tool
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression such as 12*(3+4).

        Args:
            expression: the arithmetic expression.
        """
        from lmforge.agent.builtin import calculator as evaluate

        return evaluate(expression)

    served = ServedModel("smollm2", load("smollm2-135m-instruct", dtype="fp32"), max_batch_size=1)
    with start_server({"smollm2": served}) as url:
        model = smolagents.OpenAIServerModel(model_id="smollm2", api_base=url + "/v1", api_key="unused",
                                             max_tokens=96, temperature=0)
        agent = smolagents.ToolCallingAgent(tools=[calculator], model=model, max_steps=3, verbosity_level=0)
        agent.run("What is 1234 * 5678?")
    actions = [s for s in agent.memory.steps if isinstance(s, smolagents.memory.ActionStep) and s.model_output_message]
    assert len(actions) >= 2
    for step in actions:  # the server forced and constrained each call (smolagents asks tool_choice="required")
        calls = step.model_output_message.tool_calls
        assert calls and calls[0].function.name in ("calculator", "final_answer"), step.model_output_message
        assert not isinstance(step.error, smolagents.utils.AgentParsingError)
    ran = [s for s in actions if s.model_output_message.tool_calls[0].function.name == "calculator"]
    assert ran  # smolagents ran the tool on the parsed argument: a result, or the calculator's own complaint
    assert all(s.observations or "write it like" in str(s.error) for s in ran)
