from twisted.application.service import ServiceMaker

ntonix = ServiceMaker(
    "NTONIX", "ntonix.tap", "AI inference gateway for OpenAI-compatible LLM backends", "ntonix"
)
