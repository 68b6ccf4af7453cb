import asyncio


class WeatherBackend:
    def models(self):
        return ["weather"]

    async def generate(self, job):
        yield {"type": "reasoning", "text": "The user asks about the weather."}
        for word in ["Let", " me", " look", " that", " up."]:
            await asyncio.sleep(0.05)
            yield word
        yield {"type": "tool_call", "index": 0, "id": "call_1", "name": "get_weather"}
        yield {"type": "tool_call", "index": 0, "arguments": '{"city": "Paris"}'}


backend = WeatherBackend()
