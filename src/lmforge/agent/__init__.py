"""Agents: a model that calls tools step by step until it answers (docs/AGENTS.md).

    from lmforge import load
    from lmforge.agent import Agent, LocalChat, Toolbox, builtin_tools

    agent = Agent(LocalChat(load("smollm2-135m-instruct")), Toolbox(builtin_tools(["calculator"])))
    result = agent.run("What is 1234 * 5678?", trace="runs/agent.jsonl")
    result.answer, result.stopped, result.tool_calls
"""

from lmforge.agent.backend import ChatBackend, LocalChat, RemoteChat, Reply
from lmforge.agent.builtin import BUILTIN_TOOLS, builtin_tools
from lmforge.agent.loop import Agent, AgentConfig, AgentResult
from lmforge.agent.tools import Tool, Toolbox, ToolError, ToolResult, load_tools, tool

__all__ = ["BUILTIN_TOOLS", "Agent", "AgentConfig", "AgentResult", "ChatBackend", "LocalChat", "RemoteChat", "Reply",
           "Tool", "ToolError", "ToolResult", "Toolbox", "builtin_tools", "load_tools", "tool"]
