"""The aiohttp shell: routes, WebSocket sessions, middleware, metrics and logs.

Only this package imports aiohttp; everything below it is plain asyncio.
"""
