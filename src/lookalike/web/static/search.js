// Search page: choosing, dropping or pasting an image submits it at once; oversized files are refused here.
// The label and k chosen under the forms go with whichever form is sent (a blank one with none of them).
(function () {
  const form = document.getElementById("upload-form");
  if (!form) return;
  document.querySelectorAll("[data-option]").forEach((control) => control.addEventListener("input", () => {
    document.querySelectorAll(`.ask input[type=hidden][name="${control.dataset.option}"]`).forEach((field) => {
      field.value = control.value;
      field.disabled = control.value === "";
    });
  }));
  const input = document.getElementById("file");
  const label = document.getElementById("drop");
  const maxBytes = Number(form.dataset.maxBytes);

  function showError(message) {
    let box = document.getElementById("error");
    if (!box) {
      box = document.createElement("div");
      box.id = "error";
      box.className = "error";
      box.setAttribute("role", "alert");
      document.querySelector("main").prepend(box);
    }
    box.textContent = message;
  }

  function submit(files) {
    if (!files || files.length === 0) return;
    const file = files[0];
    if (file.size > maxBytes) {
      showError(`${file.name} is ${(file.size / 1048576).toFixed(1)} MB; the limit is ${(maxBytes / 1048576).toFixed(0)} MB.`);
      return;
    }
    if (files !== input.files) {
      const transfer = new DataTransfer();
      transfer.items.add(file);
      input.files = transfer.files;
    }
    form.classList.add("busy");
    label.querySelector("strong").textContent = `Searching with ${file.name || "the pasted image"}…`;
    form.submit();
  }

  input.addEventListener("change", () => submit(input.files));
  ["dragenter", "dragover"].forEach((name) => label.addEventListener(name, (event) => {
    event.preventDefault();
    form.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((name) => label.addEventListener(name, () => form.classList.remove("over")));
  label.addEventListener("drop", (event) => {
    event.preventDefault();
    submit(event.dataTransfer.files);
  });
  document.addEventListener("paste", (event) => {
    const images = Array.from(event.clipboardData.files).filter((file) => file.type.startsWith("image/"));
    if (images.length) submit(images);
  });
})();
