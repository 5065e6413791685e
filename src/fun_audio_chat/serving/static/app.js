// The voice page of `fun-audio-chat serve`: microphone → turn detection → /v1/chat/completions (streamed)
// → reply text shown as it arrives and reply audio played chunk by chunk. Plain browser JavaScript, no build step.
//
// Turn detection is an adaptive energy detector on 20 ms frames: a frame is "voiced" when it is `vad-margin` dB
// above a slowly tracked noise floor (and above an absolute minimum); 6 voiced frames out of the last 10 start an
// utterance, `silence-ms` without voiced frames end it. 300 ms before the start are kept, so the first syllable is
// not cut. Push-to-talk (button or space bar) bypasses the detector. Speaking while a reply is streaming or playing
// stops it (barge-in): the request is aborted (the server frees its row) and the queued audio is stopped.
"use strict";

const FRAME_SECONDS = 0.02;
const PREROLL_FRAMES = 15;        // 300 ms kept before the detected start of speech
const ONSET_WINDOW = 10;          // frames looked at to decide that speech started ...
const ONSET_VOICED = 6;           // ... and how many of them must be voiced
const MIN_SPEECH_SECONDS = 0.25;  // shorter utterances are ignored (clicks, coughs)
const MAX_SPEECH_SECONDS = 30;    // a turn is cut after this long
const ABSOLUTE_MIN_DB = -55;      // quieter frames are never speech
const INPUT_RATE = 16000;         // what the model listens at

const $ = (id) => document.getElementById(id);
const state = {
  model: null,
  canSpeak: false,
  history: [],          // OpenAI-format messages of earlier turns
  audioContext: null,
  stream: null,
  frame: [],            // samples of the frame being filled
  frameSize: 960,
  preroll: [],          // last frames before speech started
  recording: null,      // frames of the utterance being captured, or null
  recent: [],           // voiced flags of the last frames
  silentFrames: 0,
  voicedFrames: 0,
  noiseFloor: -70,
  pushToTalk: false,
  reply: null,          // {controller, sources, done} of the reply being streamed/played
  playhead: 0,
};

// ------------------------------------------------------------------------------------------ small helpers
function setStatus(text, kind) {
  const status = $("status");
  status.textContent = text;
  status.dataset.state = kind || text;
  document.body.dataset.status = kind || text;
}

function bump(name) {
  document.body.dataset[name] = String(Number(document.body.dataset[name] || 0) + 1);
}

function addTurn(role, text) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  const meta = document.createElement("span");
  meta.className = "meta";
  div.append(body, meta);
  $("log").append(div);
  $("log").scrollTop = $("log").scrollHeight;
  return { div, body, meta };
}

function settings() {
  const number = (id) => ($(id).value === "" ? null : Number($(id).value));
  return {
    speech: $("speech").checked && state.canSpeak,
    voice: $("voice").value || "default",
    bargeIn: $("barge-in").checked,
    system: $("system-prompt").value.trim(),
    temperature: number("temperature") ?? 0.8,
    topP: number("top-p") ?? 1,
    seed: number("seed"),
    maxTokens: number("max-tokens"),
    historyTurns: number("history-turns") ?? 8,
    vadMargin: number("vad-margin") ?? 14,
    silenceMs: number("silence-ms") ?? 700,
  };
}

function base64FromBytes(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function bytesFromBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

// 16-bit mono wav file of float samples
function wavBytes(samples, rate) {
  const buffer = new ArrayBuffer(44 + samples.length * 2);
  const view = new DataView(buffer);
  const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(44 + i * 2, Math.round(s * 32767), true);
  }
  return new Uint8Array(buffer);
}

// the browser's own resampler (OfflineAudioContext) takes the capture rate down to 16 kHz
async function resampleTo16k(samples, rate) {
  if (rate === INPUT_RATE) return samples;
  const length = Math.ceil(samples.length * INPUT_RATE / rate);
  const offline = new OfflineAudioContext(1, length, INPUT_RATE);
  const buffer = offline.createBuffer(1, samples.length, rate);
  buffer.copyToChannel(samples, 0);
  const source = offline.createBufferSource();
  source.buffer = buffer;
  source.connect(offline.destination);
  source.start();
  return (await offline.startRendering()).getChannelData(0);
}

// ------------------------------------------------------------------------------------------ microphone
const TAP_WORKLET = `
class Tap extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) this.port.postMessage(channel.slice(0));
    return true;
  }
}
registerProcessor("tap", Tap);`;

async function ensureAudioContext() {
  if (!state.audioContext) state.audioContext = new AudioContext();
  if (state.audioContext.state === "suspended") await state.audioContext.resume();
  return state.audioContext;
}

async function startMicrophone() {
  const context = await ensureAudioContext();
  state.stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  const source = context.createMediaStreamSource(state.stream);
  const url = URL.createObjectURL(new Blob([TAP_WORKLET], { type: "application/javascript" }));
  await context.audioWorklet.addModule(url);
  const tap = new AudioWorkletNode(context, "tap");
  const mute = context.createGain();
  mute.gain.value = 0;  // the tap must be pulled by the graph, but the microphone must not reach the speakers
  source.connect(tap).connect(mute).connect(context.destination);
  state.frameSize = Math.round(context.sampleRate * FRAME_SECONDS);
  tap.port.onmessage = (event) => onSamples(event.data);
  $("start").textContent = "Microphone on";
  $("start").disabled = true;
  $("ptt").disabled = false;
  setStatus("listening");
}

function onSamples(samples) {
  for (let i = 0; i < samples.length; i++) {
    state.frame.push(samples[i]);
    if (state.frame.length === state.frameSize) {
      onFrame(Float32Array.from(state.frame));
      state.frame = [];
    }
  }
}

function frameDb(frame) {
  let energy = 0;
  for (let i = 0; i < frame.length; i++) energy += frame[i] * frame[i];
  return 10 * Math.log10(energy / frame.length + 1e-12);
}

function onFrame(frame) {
  const db = frameDb(frame);
  $("level").firstElementChild.style.width = `${Math.max(0, Math.min(100, (db + 70) * 1.6))}%`;
  const { vadMargin, silenceMs } = settings();
  const voiced = db > Math.max(state.noiseFloor + vadMargin, ABSOLUTE_MIN_DB);
  if (!state.recording) {
    // the floor follows quiet frames quickly and loud ones slowly, so speech does not raise it much
    const rate = db < state.noiseFloor ? 0.2 : 0.01;
    state.noiseFloor = Math.max(-90, state.noiseFloor + rate * (db - state.noiseFloor));
  }
  if (state.pushToTalk) {
    if (state.recording) state.recording.push(frame);
    return;
  }
  if ($("mode").value !== "vad") {
    // voice detection was switched off mid-utterance: end the turn as heard so far, not leave it open forever
    if (state.recording) endUtterance();
    return;
  }

  state.recent.push(voiced);
  if (state.recent.length > ONSET_WINDOW) state.recent.shift();
  if (!state.recording) {
    state.preroll.push(frame);
    if (state.preroll.length > PREROLL_FRAMES) state.preroll.shift();
    if (state.recent.filter(Boolean).length >= ONSET_VOICED) beginUtterance();
    return;
  }
  state.recording.push(frame);
  if (voiced) { state.silentFrames = 0; state.voicedFrames++; } else { state.silentFrames++; }
  const seconds = state.recording.length * FRAME_SECONDS;
  if (state.silentFrames * FRAME_SECONDS * 1000 >= silenceMs || seconds >= MAX_SPEECH_SECONDS) endUtterance();
}

function beginUtterance() {
  state.recording = state.preroll.slice();
  state.preroll = [];
  state.silentFrames = 0;
  state.voicedFrames = ONSET_VOICED;
  setStatus("hearing you", "hearing");
  if (state.reply && settings().bargeIn) bargeIn();
}

async function endUtterance() {
  const frames = state.recording;
  state.recording = null;
  state.recent = [];
  if (!frames) return;
  const endedAt = performance.now();
  const voicedSeconds = state.voicedFrames * FRAME_SECONDS;
  if (!state.pushToTalk && voicedSeconds < MIN_SPEECH_SECONDS) { setStatus("listening"); return; }
  const total = frames.reduce((n, f) => n + f.length, 0);
  const samples = new Float32Array(total);
  let offset = 0;
  for (const f of frames) { samples.set(f, offset); offset += f.length; }
  const audio16k = await resampleTo16k(samples, state.audioContext.sampleRate);
  bump("utterances");
  const data = base64FromBytes(wavBytes(audio16k, INPUT_RATE));
  const turn = addTurn("user", `(spoken) ${(audio16k.length / INPUT_RATE).toFixed(1)} s of speech`);
  sendTurn({ role: "user", content: [{ type: "input_audio", input_audio: { data, format: "wav" } }] }, endedAt, turn);
}

function pushToTalk(down) {
  if (!state.stream) return;
  if (down && !state.pushToTalk) {
    state.pushToTalk = true;
    $("ptt").dataset.held = "1";
    state.recording = state.preroll.slice(-5);
    state.voicedFrames = 0;
    setStatus("hearing you", "hearing");
    if (state.reply && settings().bargeIn) bargeIn();
  } else if (!down && state.pushToTalk) {
    $("ptt").dataset.held = "0";
    endUtterance().finally(() => { state.pushToTalk = false; });
  }
}

// ------------------------------------------------------------------------------------------ replies
function stopReply(interrupted) {
  const reply = state.reply;
  if (!reply) return;
  state.reply = null;
  reply.controller.abort();
  for (const source of reply.sources) { try { source.stop(); } catch (e) { /* already stopped */ } }
  if (interrupted) reply.turn.div.classList.add("interrupted");
}

function bargeIn() {
  bump("bargeIns");
  stopReply(true);
}

function historyToSend(newMessage) {
  const { system, historyTurns } = settings();
  const earlier = historyTurns > 0 ? state.history.slice(-2 * historyTurns) : [];
  const messages = system ? [{ role: "system", content: system }] : [];
  return messages.concat(earlier, [newMessage]);
}

async function sendTurn(userMessage, startedAt, userTurn) {
  stopReply(true);
  const options = settings();
  const body = {
    model: state.model,
    messages: historyToSend(userMessage),
    modalities: options.speech ? ["text", "audio"] : ["text"],
    stream: true,
    temperature: options.temperature,
    top_p: options.topP,
  };
  if (options.maxTokens !== null) body.max_tokens = options.maxTokens;
  if (options.speech) body.audio = { voice: options.voice, format: "pcm16" };
  if (options.seed !== null) body.seed = options.seed;

  const turn = addTurn("assistant", "");
  const reply = { controller: new AbortController(), sources: [], turn, text: "", pending: 0, streaming: true };
  state.reply = reply;
  setStatus("thinking");
  let firstText = null;
  let firstAudio = null;
  let sampleRate = 24000;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: reply.controller.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({ error: { message: response.statusText } }));
      const message = error.error ? error.error.message : response.statusText;
      if (message.includes("exceeds the model's context") && body.messages.length > 1 && state.history.length) {
        // the conversation outgrew the model: forget the oldest exchange and ask again
        state.history.splice(0, 2);
        turn.div.remove();
        state.reply = null;
        return sendTurn(userMessage, startedAt, userTurn);
      }
      throw new Error(message);
    }
    sampleRate = Number(response.headers.get("x-audio-sample-rate")) || state.sampleRate || sampleRate;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) !== -1) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (!delta) continue;
        const text = delta.content || (delta.audio && delta.audio.transcript);
        if (text) {
          if (firstText === null) firstText = performance.now();
          reply.text += text;
          turn.body.textContent = reply.text;
          $("log").scrollTop = $("log").scrollHeight;
        }
        if (delta.audio && delta.audio.data && state.reply === reply) {
          if (firstAudio === null) firstAudio = performance.now();
          playChunk(reply, bytesFromBase64(delta.audio.data), sampleRate);
        }
        if (delta.tool_calls) {
          for (const call of delta.tool_calls) {
            reply.text += `\n[tool call] ${call.function.name}(${call.function.arguments})`;
          }
          turn.body.textContent = reply.text;
        }
      }
    }
    reply.streaming = false;
    const timing = [];
    if (firstText !== null) timing.push(`first text ${((firstText - startedAt) / 1000).toFixed(2)} s`);
    if (firstAudio !== null) timing.push(`first audio ${((firstAudio - startedAt) / 1000).toFixed(2)} s`);
    turn.meta.textContent = timing.join(" · ") + (timing.length ? " after the end of your turn" : "");
    state.history.push(userMessage, { role: "assistant", content: reply.text });
    bump("turns");
    if (state.reply === reply && reply.pending === 0) finishReply(reply);
  } catch (error) {
    reply.streaming = false;
    if (error.name === "AbortError") {  // barge-in or a new turn: keep what was said so far in the history
      state.history.push(userMessage, { role: "assistant", content: reply.text });
      return;
    }
    turn.div.classList.add("error");
    turn.body.textContent = `Error: ${error.message}`;
    setStatus("error");
    if (state.reply === reply) state.reply = null;
    if (userTurn) userTurn.meta.textContent = "not answered";
  }
}

function playChunk(reply, bytes, sampleRate) {
  const context = state.audioContext;
  const pcm = new Int16Array(bytes.buffer, bytes.byteOffset, Math.floor(bytes.length / 2));
  if (!pcm.length) return;
  const buffer = context.createBuffer(1, pcm.length, sampleRate);
  const channel = buffer.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) channel[i] = pcm[i] / 32768;
  const source = context.createBufferSource();
  source.buffer = buffer;
  source.connect(context.destination);
  const when = Math.max(context.currentTime + 0.05, state.playhead);
  source.start(when);
  state.playhead = when + buffer.duration;
  reply.sources.push(source);
  reply.pending++;
  setStatus("speaking");
  source.onended = () => {
    reply.pending--;
    if (state.reply === reply) bump("chunksPlayed");
    if (state.reply === reply && reply.pending === 0 && !reply.streaming) finishReply(reply);
  };
}

function finishReply(reply) {
  if (state.reply === reply) state.reply = null;
  setStatus(state.stream ? "listening" : "idle");
}

// ------------------------------------------------------------------------------------------ page wiring
// The voice picker lists the server's voices (GET /v1/voices), the default speaker first.
async function loadVoices() {
  const response = await fetch("/v1/voices");
  if (!response.ok) return;
  const picker = $("voice");
  picker.replaceChildren();
  for (const voice of (await response.json()).data) {
    const option = document.createElement("option");
    option.value = voice.id;
    option.textContent = voice.default ? `${voice.id} (the detokenizer's own speaker)` : voice.id;
    picker.append(option);
  }
  picker.value = "default";
}

async function init() {
  try {
    const models = await (await fetch("/v1/models")).json();
    state.model = models.data[0].id;
    const health = await (await fetch("/health")).json();
    state.canSpeak = Boolean(health.speech);
    state.sampleRate = health.sample_rate || 24000;
    $("model").textContent = `model: ${state.model}${state.canSpeak ? "" : " (text replies only: no detokenizer)"}`;
    if (!state.canSpeak) { $("speech").checked = false; $("speech").disabled = true; $("voice").disabled = true; }
    await loadVoices();
  } catch (error) {
    setStatus("server unreachable", "error");
  }
  $("start").addEventListener("click", () => startMicrophone().catch((error) => {
    setStatus(`microphone: ${error.message}`, "error");
  }));
  $("ptt").addEventListener("pointerdown", () => pushToTalk(true));
  $("ptt").addEventListener("pointerup", () => pushToTalk(false));
  $("ptt").addEventListener("pointerleave", () => pushToTalk(false));
  document.addEventListener("keydown", (event) => {
    if (event.code === "Space" && event.target === document.body) { event.preventDefault(); pushToTalk(true); }
  });
  document.addEventListener("keyup", (event) => {
    if (event.code === "Space" && event.target === document.body) { event.preventDefault(); pushToTalk(false); }
  });
  $("composer").addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = $("text-input").value.trim();
    if (!text) return;
    $("text-input").value = "";
    await ensureAudioContext();
    const turn = addTurn("user", text);
    sendTurn({ role: "user", content: text }, performance.now(), turn);
  });
  $("clear").addEventListener("click", () => {
    stopReply(false);
    state.history = [];
    $("log").replaceChildren();
  });
}

init();
