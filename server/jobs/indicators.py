"""Technical indicators over closing prices. Pure functions, oldest value first."""

from __future__ import annotations

from collections.abc import Sequence


def sma(values: Sequence[float], period: int) -> list[float | None]:
    """Simple moving average; None until `period` values are available."""
    out: list[float | None] = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= period:
            total -= values[i - period]
        out.append(total / period if i >= period - 1 else None)
    return out


def ema(values: Sequence[float], period: int) -> list[float]:
    """Exponential moving average seeded with the first value."""
    alpha = 2 / (period + 1)
    out: list[float] = []
    for value in values:
        out.append(value if not out else alpha * value + (1 - alpha) * out[-1])
    return out


def rsi(values: Sequence[float], period: int = 14) -> float:
    """Wilder's relative strength index of the whole series (0..100)."""
    if len(values) <= period:
        raise ValueError(f"RSI({period}) needs more than {period} values")
    gains = [max(b - a, 0.0) for a, b in zip(values, values[1:], strict=False)]
    losses = [max(a - b, 0.0) for a, b in zip(values, values[1:], strict=False)]
    avg_gain = sum(gains[:period]) / period
    avg_loss = sum(losses[:period]) / period
    for gain, loss in zip(gains[period:], losses[period:], strict=True):
        avg_gain = (avg_gain * (period - 1) + gain) / period
        avg_loss = (avg_loss * (period - 1) + loss) / period
    if avg_loss == 0:
        return 100.0
    return 100 - 100 / (1 + avg_gain / avg_loss)


def macd(
    values: Sequence[float], fast: int = 12, slow: int = 26, signal: int = 9
) -> tuple[list[float], list[float], list[float]]:
    """MACD line, signal line and histogram."""
    line = [f - s for f, s in zip(ema(values, fast), ema(values, slow), strict=True)]
    signal_line = ema(line, signal)
    histogram = [m - s for m, s in zip(line, signal_line, strict=True)]
    return line, signal_line, histogram


def trading_signal(
    close: float, ma: dict[str, float], rsi_value: float, macd_hist: Sequence[float]
) -> tuple[str, int, list[str]]:
    """A buy/hold/sell call from a few classic rules; returns (signal, score, reasons)."""
    score = 0
    reasons = []
    if ma["ma5"] > ma["ma10"] > ma["ma20"]:
        score += 1
        reasons.append("moving averages in bullish order (MA5 > MA10 > MA20)")
    elif ma["ma5"] < ma["ma10"] < ma["ma20"]:
        score -= 1
        reasons.append("moving averages in bearish order (MA5 < MA10 < MA20)")
    if close > ma["ma20"]:
        score += 1
        reasons.append("close above MA20")
    else:
        score -= 1
        reasons.append("close below MA20")
    if rsi_value >= 70:
        score -= 1
        reasons.append(f"RSI {rsi_value:.1f} overbought")
    elif rsi_value <= 30:
        score += 1
        reasons.append(f"RSI {rsi_value:.1f} oversold")
    if len(macd_hist) >= 2:
        if macd_hist[-2] <= 0 < macd_hist[-1]:
            score += 1
            reasons.append("MACD crossed above its signal line")
        elif macd_hist[-2] >= 0 > macd_hist[-1]:
            score -= 1
            reasons.append("MACD crossed below its signal line")
        elif macd_hist[-1] > 0:
            reasons.append("MACD above its signal line")
        else:
            reasons.append("MACD below its signal line")
    signal = "buy" if score >= 2 else "sell" if score <= -2 else "hold"
    return signal, score, reasons
