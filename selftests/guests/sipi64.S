/* SPDX-License-Identifier: GPL-2.0 */
/*
 * INIT/SIPI start-up of an AP in real mode (a flat binary at 0x100000; vCPU 0 in long
 * mode, vCPU 1 waiting for a SIPI). vCPU 0 copies a real-mode trampoline to 0x8000 and
 * sends INIT, then a start-up IPI with vector 8, through its xAPIC ICR. vCPU 1 starts
 * at 0800:0000 in real mode: CLI, a marker at 0x9000, LGDT, CR0.PE through MOV CR0, a
 * far JMP into 32-bit protected mode, a second marker at 0x9001, CLI; HLT. vCPU 0 waits
 * for both markers (about 10 s of guest time at most) and exits with 0x2a, or 1.
 */
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
	.set APIC, 0xfee00000
_start:
	lea	rsi, [rip + tramp]
	mov	rdi, 0x8000
	mov	rcx, tramp_end - tramp
	rep	movsb
	mov	rdx, APIC
	mov	dword ptr [rdx + 0xf0], 0x1ff			/* software-enable */
	mov	dword ptr [rdx + 0x310], 1 << 24
	mov	dword ptr [rdx + 0x300], 0x4500		/* INIT, assert */
	mov	dword ptr [rdx + 0x310], 1 << 24
	mov	dword ptr [rdx + 0x300], 0x4608		/* start-up, vector 8 */
	rdtsc
	shl	rdx, 32
	or	rax, rdx
	mov	r8, rax
	movabs	r9, 10000000000
1:	pause
	cmp	word ptr [0x9000], 0x5b5a
	je	2f
	rdtsc
	shl	rdx, 32
	or	rax, rdx
	sub	rax, r8
	cmp	rax, r9
	jb	1b
	lea	rsi, [rip + s_fail]
	call	puts
	mov	al, 1
	out	0xf4, al
	hlt
2:	lea	rsi, [rip + s_ok]
	call	puts
	mov	al, 0x2a
	out	0xf4, al
	hlt

puts:
	mov	dx, 0x3f8
3:	lodsb
	test	al, al
	jz	4f
	out	dx, al
	jmp	3b
4:	ret

/* The trampoline, run from 0x8000. */
	.code16
tramp:
	cli
	xor	ax, ax
	mov	ds, ax
	mov	byte ptr [0x9000], 0x5a
	lgdt	[0x8000 + gdtr16 - tramp]
	mov	eax, cr0
	or	al, 1
	mov	cr0, eax
	ljmp	0x08, 0x8000 + pm32 - tramp
	.code32
pm32:
	mov	ax, 0x10
	mov	ds, ax
	mov	byte ptr [0x9001], 0x5b
	cli
	hlt
	.balign	8
gdt16:	.quad	0
	.quad	0x00cf9a000000ffff
	.quad	0x00cf92000000ffff
gdtr16:	.word	3 * 8 - 1
	.long	0x8000 + gdt16 - tramp
tramp_end:

	.data
s_ok:	.asciz	"sipi64: the AP ran real mode and reached protected mode\n"
s_fail:	.asciz	"sipi64: FAILED: no markers from the AP\n"
